//! Configuration: the file format, its validation, and the validated [`Config`].
//!
//! Two stages, as in sozu and pingora: [`mod@file`] holds raw serde structs that deny
//! unknown keys; `validate` turns them into a [`Config`] whose every value has been checked
//! (every number bounded), or into a [`ConfigError`] naming file, line, column and key of
//! every problem found.
//! `rollgate check`, startup and reload all call [`Config::load`], so what `check` accepts
//! is exactly what the proxy will serve.

pub mod file;
mod validate;

pub use validate::content_hash;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue};

pub use file::{PinQuarantined, PinUnknown, Severity};

/// A version's name as written in the config (`v2.5`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionName(pub Arc<str>);

impl VersionName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VersionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for VersionName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for VersionName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(VersionName(Arc::from(s.as_ref())))
    }
}

impl From<&str> for VersionName {
    fn from(s: &str) -> Self {
        VersionName(Arc::from(s))
    }
}

/// A split weight: a non-negative integer, relative to the route's other weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Weight(pub u32);

/// A validated config, ready to compile into a routing table.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (for messages and reload).
    pub source: PathBuf,
    /// `sha256:<hex>` of the file's bytes.
    pub hash: String,
    /// The file as read, defaults filled in, as JSON (`GET /api/v1/config`).
    pub document: Arc<serde_json::Value>,
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub admin: AdminConfig,
    pub health_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub drain_timeout: Duration,
    /// Requests in flight through the data plane before new ones are shed (503 +
    /// `Retry-After`). Reloadable.
    pub max_in_flight: usize,
    /// Sorted by name.
    pub versions: Vec<VersionConfig>,
    /// In file order: the first matching route wins.
    pub routes: Vec<RouteConfig>,
    pub pin: PinConfig,
    pub evaluator: EvaluatorConfig,
    pub alerts: AlertsConfig,
    /// `None`: this replica decides alone.
    pub fleet: Option<FleetConfig>,
    /// `None`: no access log (the default). Reloadable: a reload that changes it replaces
    /// the running access log (new path and sample rate take effect at once).
    pub access_log: Option<AccessLogConfig>,
}

/// The `access_log:` block, validated (SPEC sections 3 and 7): one JSON line per request.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub path: AccessLogPath,
    /// Share of requests logged, in (0, 1].
    pub sample: f64,
}

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogPath {
    Stdout,
    Stderr,
    /// Resolved against the config file's directory; reopened on SIGUSR1 (logrotate).
    File(PathBuf),
}

impl fmt::Display for AccessLogPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogPath::Stdout => f.write_str("stdout"),
            AccessLogPath::Stderr => f.write_str("stderr"),
            AccessLogPath::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// gRPC status codes that count against a version unless a route says otherwise: UNKNOWN
/// (2), DEADLINE_EXCEEDED (4), INTERNAL (13), UNAVAILABLE (14), DATA_LOSS (15), as a
/// [`RouteConfig::grpc_fault_codes`] bitmask.
pub const DEFAULT_GRPC_FAULT_CODES: u32 = (1 << 2) | (1 << 4) | (1 << 13) | (1 << 14) | (1 << 15);

/// The `fleet:` block, validated (SPEC section 10).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// The store's URL as written (a password in it is never logged: see [`Self::redacted`]).
    pub store: String,
    pub password_file: Option<PathBuf>,
    pub name: String,
    /// This replica's name, resolved from the file or the environment.
    pub replica: String,
    pub pool: bool,
}

impl FleetConfig {
    /// The store URL without its password, for logs, status and records.
    pub fn redacted(&self) -> String {
        redact_url(&self.store)
    }
}

/// `url` without its password, for every message that quotes a store URL (a refused one
/// included): whatever comes before the last `@` ahead of the query (user and password,
/// also one that holds a `/`) becomes `***`, and so does the value of a `pass` or
/// `password` query parameter (where unix-socket URLs carry it).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let q = rest.find(['?', '#']).unwrap_or(rest.len());
    let (head, tail) = rest.split_at(q);
    let mut out = String::with_capacity(url.len());
    if let Some(s) = scheme {
        out.push_str(s);
        out.push_str("://");
    }
    match head.rsplit_once('@') {
        Some((_, host)) => {
            out.push_str("***@");
            out.push_str(host);
        }
        None => out.push_str(head),
    }
    for (i, part) in tail.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        // The first part keeps its `?` (or `#`) in front of the key.
        let key = part.trim_start_matches(['?', '#']);
        match key.split_once('=') {
            Some((k, _))
                if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
            {
                out.push_str(&part[..part.len() - key.len()]);
                out.push_str(k);
                out.push_str("=***");
            }
            _ => out.push_str(part),
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// Extra `Host` names (lowercase, no port, valid DNS names) the admin API answers to,
    /// besides IP literals and `localhost`.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointScheme {
    Http,
    Https,
    /// HTTP/2 with prior knowledge over plain TCP (gRPC).
    H2c,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub scheme: EndpointScheme,
    pub authority: Authority,
    /// As written, for status output.
    pub url: String,
}

impl Endpoint {
    /// The scheme used on the wire in the request URI (`h2c` travels as `http`).
    pub fn uri_scheme(&self) -> Scheme {
        match self.scheme {
            EndpointScheme::Https => Scheme::HTTPS,
            EndpointScheme::Http | EndpointScheme::H2c => Scheme::HTTP,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

#[derive(Debug, Clone)]
pub struct VersionConfig {
    pub name: VersionName,
    pub endpoints: Vec<Endpoint>,
    pub bundle: BTreeMap<String, String>,
    pub last_verified: Option<String>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub health_check: Option<HealthCheckConfig>,
    pub ca_file: Option<PathBuf>,
    /// Hash of endpoints + bundle + injected headers: a change lifts a quarantine.
    pub fingerprint: String,
}

#[derive(Debug, Clone, Default)]
pub struct MatchConfig {
    pub path_prefix: Option<String>,
    pub host: Option<String>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub models: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum StickyKey {
    Header(HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone)]
pub struct ShadowConfig {
    pub version: VersionName,
    pub percent: u32,
}

#[derive(Debug, Clone)]
pub struct RolloutConfig {
    pub steps: Vec<u32>,
    pub hold: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub budget_percent: u32,
    pub min_per_second: u32,
    pub non_idempotent: bool,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: Arc<str>,
    pub owner: Option<String>,
    pub matcher: MatchConfig,
    pub baseline: VersionName,
    /// Every version the route knows, with its configured weight (the baseline included,
    /// at weight 0 when the file's split leaves it out).
    pub split: Vec<(VersionName, Weight)>,
    pub sticky: Option<StickyKey>,
    pub shadow: Option<ShadowConfig>,
    pub rollout: Option<RolloutConfig>,
    pub fallback: Option<VersionName>,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    pub max_request_body: u64,
    /// gRPC status codes that count against a version: bit `n` set means code `n` (0 to
    /// 16) is the version's fault. Default [`DEFAULT_GRPC_FAULT_CODES`].
    pub grpc_fault_codes: u32,
}

impl RouteConfig {
    /// Whether a response's `grpc-status` counts against the version that gave it.
    pub fn is_grpc_fault(&self, code: u32) -> bool {
        code < 32 && self.grpc_fault_codes & (1 << code) != 0
    }
}

#[derive(Debug, Clone)]
pub struct PinConfig {
    pub header: HeaderName,
    pub quarantined: PinQuarantined,
    pub unknown: PinUnknown,
}

#[derive(Debug, Clone)]
pub struct DriftRule {
    pub signal: Signal,
    /// Deprecated: the sequential drift test takes its threshold from
    /// `evaluator.confidence`. Kept (validated in (0, 1)) so existing files load.
    pub p_value: f64,
    /// Deprecated: the sequential drift test needs no run of significant checks. Kept
    /// (validated in 1..=1000) so existing files load.
    pub consecutive: u32,
}

/// Where the drift rule reads its numeric signal from each response.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// `header:NAME`: a response header parsed as a number.
    Header(HeaderName),
    /// `json:FIELD`: a top-level numeric field of a JSON response body (bodies up to
    /// [`Signal::JSON_BODY_LIMIT`]).
    Json(Arc<str>),
}

impl Signal {
    /// Largest JSON body searched for a `json:` signal; longer bodies give no sample.
    pub const JSON_BODY_LIMIT: usize = 64 * 1024;
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signal::Header(h) => write!(f, "header:{h}"),
            Signal::Json(k) => write!(f, "json:{k}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SafetyRule {
    pub header: HeaderName,
    pub max: u64,
    pub per: Duration,
}

#[derive(Debug, Clone)]
pub struct Rules {
    pub error_rate_ratio: Option<f64>,
    /// `error_rate_ratio` never trips while the candidate's error rate is below this
    /// (in (0, 1); `None`: no floor, as `null` or 0 in the file).
    pub min_error_rate: Option<f64>,
    pub error_rate_max: Option<f64>,
    pub latency_p99_max: Option<Duration>,
    pub latency_p99_ratio: Option<f64>,
    pub health_failures: Option<u32>,
    pub accuracy_drop: Option<f64>,
    pub drift: Option<DriftRule>,
    pub safety_violations: Option<SafetyRule>,
}

#[derive(Debug, Clone)]
pub struct EvaluatorConfig {
    pub interval: Duration,
    pub window: Duration,
    pub min_requests: u64,
    pub confidence: f64,
    pub rules: Rules,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    pub min_severity: Severity,
}

#[derive(Debug, Clone, Default)]
pub struct AlertsConfig {
    pub webhooks: Vec<Webhook>,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based; 0 when the position is unknown.
    pub line: u64,
    pub column: u64,
    /// Dotted key path (`routes[0].split`).
    pub key: String,
    pub message: String,
}

/// Every problem found in one file; nothing of it was applied.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}:{}:{}: ", self.file.display(), p.line, p.column)?;
            if !p.key.is_empty() {
                write!(f, "{}: ", p.key)?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    pub(crate) fn single(file: &Path, line: u64, column: u64, key: &str, message: String) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem {
                line,
                column,
                key: key.to_string(),
                message,
            }],
        }
    }
}

impl Config {
    /// Reads and validates `path`. YAML unless the extension is `.toml`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::single(path, 0, 0, "", format!("cannot read config file: {e}"))
        })?;
        Config::from_str(&text, path)
    }

    /// Parses and validates a config text. `origin` names the file in messages, anchors
    /// relative paths, and its extension picks the format.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        validate::parse_and_validate(text, origin)
    }

    pub fn version(&self, name: &str) -> Option<&VersionConfig> {
        self.versions.iter().find(|v| v.name.as_str() == name)
    }
}

/// JSON Schema of the config file (draft 2020-12), for editors and CI.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(file::FileConfig);
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}
