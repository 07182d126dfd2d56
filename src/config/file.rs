//! Raw config structs, exactly as written in the file.
//!
//! Every struct denies unknown keys. Leaf values whose meaning is checked later (durations,
//! addresses, version references, numbers with a range) are wrapped in [`Located`], so
//! `validate` can point at the line and column they came from. Nothing here is trusted:
//! `validate` turns a [`FileConfig`] into a [`super::Config`] or a list of located problems.
//! The range of every number is stated in its field's doc comment (the JSON schema's
//! description).

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value with the position it was read from (1-based line and column; 0 when unknown,
/// as for TOML input, whose syntax errors carry their own position).
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub value: T,
    pub line: u64,
    pub column: u64,
}

impl<T> Located<T> {
    pub fn new(value: T) -> Self {
        Located {
            value,
            line: 0,
            column: 0,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = serde_saphyr::Spanned::<T>::deserialize(d)?;
        Ok(Located {
            value: s.value,
            line: s.referenced.line(),
            column: s.referenced.column(),
        })
    }
}

impl<T: Serialize> Serialize for Located<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

type L<T> = Located<T>;

/// The whole file. See `config/rollgate.example.yaml` for every key with its meaning.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data-plane address: HTTP/1.1 and h2c (prior knowledge) on one port.
    #[serde(default = "default_listen")]
    pub listen: L<String>,
    /// Downstream TLS (ALPN h2, http/1.1).
    #[serde(default)]
    pub tls: Option<L<FileTls>>,
    #[serde(default)]
    pub admin: FileAdmin,
    /// Read-only /healthz, /readyz and /metrics for kubelet probes and Prometheus.
    #[serde(default)]
    pub health_listen: Option<L<String>>,
    /// Quarantines, rollout progress and audit.jsonl live here.
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    /// How long in-flight requests may take to finish after SIGTERM (default 25s; 0s to
    /// 1h).
    #[serde(default)]
    pub drain_timeout: Option<L<String>>,
    /// Requests in flight through the data plane before new ones get 503 + Retry-After
    /// (default 10000; 1 to 10000000).
    #[serde(default)]
    pub max_in_flight: Option<L<u64>>,
    pub versions: BTreeMap<String, L<FileVersion>>,
    pub routes: Vec<L<FileRoute>>,
    #[serde(default)]
    pub pin: FilePin,
    #[serde(default)]
    pub evaluator: FileEvaluator,
    #[serde(default)]
    pub alerts: FileAlerts,
    /// Replicas that name the same store and fleet name share their runtime state and
    /// decisions (SPEC section 10). Absent or null: this replica decides alone.
    #[serde(default)]
    pub fleet: Option<L<FileFleet>>,
    /// One JSON line per request (SPEC section 7). Absent or null: no access log.
    #[serde(default)]
    pub access_log: Option<L<FileAccessLog>>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileAccessLog {
    /// `stdout`, `stderr`, or a file path (relative to the config file's directory; its
    /// directory must exist; reopened on SIGUSR1 for logrotate). Default `stdout`.
    #[serde(default)]
    pub path: Option<L<String>>,
    /// Share of requests logged (default 1.0; above 0, at most 1).
    #[serde(default)]
    pub sample: Option<L<f64>>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileFleet {
    /// `redis://host:port/db` or `rediss://` (TLS) of a Redis >= 6 or Valkey; a password
    /// may be given in the URL (`redis://:secret@host:6379/0`) or in `password_file`.
    pub store: L<String>,
    /// A file holding the store's password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<String>,
    /// Replicas with the same name share state: 1 to 64 of letters, digits, '.', '_', '-'.
    pub name: L<String>,
    /// This replica's name in the fleet (default: $ROLLGATE_REPLICA, else $POD_NAME, else
    /// the hostname): 1 to 253 printable characters, no spaces.
    #[serde(default)]
    pub replica: Option<L<String>>,
    /// The evaluator tests the fleet's pooled counts (default true).
    #[serde(default)]
    pub pool: Option<bool>,
}

fn default_listen() -> L<String> {
    Located::new("0.0.0.0:8080".into())
}
fn default_state_dir() -> String {
    "./rollgate-state".into()
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    /// Control-plane address (default 127.0.0.1:9901).
    #[serde(default)]
    pub listen: Option<L<String>>,
    /// Bearer token for mutating calls; required to bind a non-loopback address.
    #[serde(default)]
    pub token_file: Option<String>,
    /// Extra `Host` names the admin API answers to, besides IP literals and `localhost`
    /// (everything else gets 403, against DNS rebinding), e.g. `rollgate-admin.ml`. DNS
    /// names without a port: letters, digits, '-' and '.', labels of 1 to 63 characters,
    /// at most 253 characters in all; compared case-insensitively.
    #[serde(default)]
    pub hosts: Vec<L<String>>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileVersion {
    /// `http://`, `https://` (verified TLS with SNI) or `h2c://` (HTTP/2 prior knowledge, gRPC).
    pub endpoints: Vec<L<String>>,
    /// The decision surface this version stands for: model, prompt, policy, tools...
    #[serde(default)]
    pub bundle: BTreeMap<String, String>,
    /// When this bundle was last verified good (a date).
    #[serde(default)]
    pub last_verified: Option<String>,
    /// Headers set on every upstream request to this version (replacing client values).
    #[serde(default)]
    pub set_headers: BTreeMap<String, L<String>>,
    #[serde(default)]
    pub health_check: Option<L<FileHealthCheck>>,
    /// Extra PEM CA bundle trusted for this version's `https://` endpoints (in addition to
    /// the built-in web PKI roots). An extension to the SPEC's keys.
    #[serde(default)]
    pub ca_file: Option<L<String>>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    /// Path requested with GET on every endpoint; must start with `/`.
    pub path: String,
    /// Time between two checks of an endpoint (default 5s; 10ms to 1h).
    #[serde(default)]
    pub interval: Option<L<String>>,
    /// How long one check may take before it counts as failed (default 1s; 1ms to 1h).
    #[serde(default)]
    pub timeout: Option<L<String>>,
    /// Consecutive failed checks that take an endpoint out of rotation (default 3; 1 to
    /// 1000).
    #[serde(default)]
    pub unhealthy_after: Option<L<u32>>,
    /// Consecutive passed checks that put it back (default 2; 1 to 1000).
    #[serde(default)]
    pub healthy_after: Option<L<u32>>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub name: L<String>,
    /// Who may and must act on this route's rollbacks.
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default, rename = "match")]
    pub matcher: FileMatch,
    /// The known-good version: it receives the traffic others lose.
    pub baseline: L<String>,
    /// Integer weights, 0 to 1000000 each, summing to more than 0 and at most 1000000000;
    /// weight-0 versions stay pinnable.
    pub split: L<BTreeMap<String, u32>>,
    #[serde(default)]
    pub sticky: Option<L<FileSticky>>,
    #[serde(default)]
    pub shadow: Option<L<FileShadow>>,
    #[serde(default)]
    pub rollout: Option<L<FileRollout>>,
    /// Version served when the baseline is unhealthy too.
    #[serde(default)]
    pub fallback: Option<L<String>>,
    #[serde(default)]
    pub timeouts: FileTimeouts,
    #[serde(default)]
    pub retry: FileRetry,
    /// Largest request body buffered (model routing, retries, shadow copies) and accepted
    /// (default 10MiB; 0 to 1GiB).
    #[serde(default)]
    pub max_request_body: Option<L<String>>,
    /// gRPC status codes (0 to 16) that count against a version (default [2, 4, 13, 14,
    /// 15]: UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS; an empty list: none).
    #[serde(default)]
    pub grpc_fault_codes: Option<Vec<L<u32>>>,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileMatch {
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, L<String>>,
    /// Model names matched against the JSON body's `model` field or `x-gateway-model-name`.
    #[serde(default)]
    pub model: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSticky {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileShadow {
    /// The version that gets copies of the route's requests; its answers are discarded.
    pub version: String,
    /// Share of the route's requests copied (0 to 100).
    pub percent: L<u32>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRollout {
    /// The candidate's weight, in percent, at each step: strictly increasing, each in 1 to
    /// 100; at 100 the candidate becomes the baseline.
    pub steps: Vec<u32>,
    /// How long each step must hold cleanly before the next (1ms to 7 days).
    pub hold: L<String>,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    /// Connecting to an endpoint (default 2s; 1ms to 24h).
    #[serde(default)]
    pub connect: Option<L<String>>,
    /// Request fully sent to first response byte (default 60s; 1ms to 24h).
    #[serde(default)]
    pub first_byte: Option<L<String>>,
    /// Longest silence inside a response body (default 60s; 1ms to 24h).
    #[serde(default)]
    pub idle: Option<L<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRetry {
    /// Retries allowed as a percentage of recent requests (default 20; 0 to 100).
    #[serde(default)]
    pub budget_percent: Option<L<u32>>,
    /// Retries allowed per second on top of the percentage (default 10; 0 to 100000).
    #[serde(default)]
    pub min_per_second: Option<L<u32>>,
    /// Retry a request that got a 5xx or reset before any byte reached the client
    /// (default true: model inference is side-effect free).
    #[serde(default)]
    pub non_idempotent: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilePin {
    #[serde(default)]
    pub header: Option<L<String>>,
    #[serde(default)]
    pub quarantined: Option<PinQuarantined>,
    #[serde(default)]
    pub unknown: Option<PinUnknown>,
}

/// What a pin to a quarantined version gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PinQuarantined {
    /// Served by the route's baseline instead.
    #[default]
    Baseline,
    /// Served by the quarantined version anyway (debugging).
    Honor,
    /// 409 Conflict.
    Reject,
}

/// What a pin naming no version of the route gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PinUnknown {
    /// 400 Bad Request.
    #[default]
    Reject,
    /// Routed as if unpinned.
    Ignore,
}

/// Evaluator settings. A rule absent from the file is on with its default; `null` turns it off.
#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileEvaluator {
    /// Time between two evaluator ticks (default 100ms; 10ms to 1h).
    #[serde(default)]
    pub interval: Option<L<String>>,
    /// Sliding window each tick looks at (default 30s; longer than `interval`, at most
    /// 24h).
    #[serde(default)]
    pub window: Option<L<String>>,
    /// Requests per version per window before any statistical rule (default 50; 1 to
    /// 1000000000).
    #[serde(default)]
    pub min_requests: Option<L<u64>>,
    /// 1 - false rollbacks per healthy candidate per 24 h, per rule (default 0.99; above
    /// 0.5, at most 0.999999). Also sets the threshold of the sequential `drift` test.
    #[serde(default)]
    pub confidence: Option<L<f64>>,
    #[serde(default)]
    pub rules: FileRules,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRules {
    /// Trips when the candidate's error rate exceeds this multiple of the baseline's
    /// (default 2.0; above 1, at most 1000; null: off).
    #[serde(default = "d_error_rate_ratio")]
    pub error_rate_ratio: Option<L<f64>>,
    /// `error_rate_ratio` never trips while the candidate's error rate is below this
    /// (default 0.005; 0 or more, below 1; null: no floor).
    #[serde(default = "d_min_error_rate")]
    pub min_error_rate: Option<L<f64>>,
    /// Trips when the candidate's error rate exceeds this fraction, whatever the baseline
    /// does (default 0.05; above 0, below 1; null: off).
    #[serde(default = "d_error_rate_max")]
    pub error_rate_max: Option<L<f64>>,
    /// Absolute SLA on the candidate's p99 time to first byte (default 500ms; 1ms to 1h;
    /// null: off). For a non-streaming completion the first byte comes after the whole
    /// generation: `rollgate check` warns where that applies.
    #[serde(default = "d_latency_p99_max")]
    pub latency_p99_max: Option<L<String>>,
    /// Trips when the candidate's p99 time to first byte exceeds this multiple of the
    /// baseline's (default 1.5; above 1, at most 1000; null: off).
    #[serde(default = "d_latency_p99_ratio")]
    pub latency_p99_ratio: Option<L<f64>>,
    /// Rolls back once all the candidate's endpoints failed this many consecutive active
    /// health checks (default 3; 1 to 1000; null: off). Needs `health_check` on the version.
    #[serde(default = "d_health_failures")]
    pub health_failures: Option<L<u32>>,
    /// Trips when the candidate's feedback accuracy (POST /api/v1/feedback) is this much
    /// below the baseline's (default 0.05; above 0, below 1; null: off).
    #[serde(default = "d_accuracy_drop")]
    pub accuracy_drop: Option<L<f64>>,
    /// Distribution shift of a numeric response signal (default null: off).
    #[serde(default)]
    pub drift: Option<L<FileDrift>>,
    /// Too many responses flagged by a guardrail (default null: off).
    #[serde(default)]
    pub safety_violations: Option<L<FileSafety>>,
}

impl Default for FileRules {
    fn default() -> Self {
        FileRules {
            error_rate_ratio: d_error_rate_ratio(),
            min_error_rate: d_min_error_rate(),
            error_rate_max: d_error_rate_max(),
            latency_p99_max: d_latency_p99_max(),
            latency_p99_ratio: d_latency_p99_ratio(),
            health_failures: d_health_failures(),
            accuracy_drop: d_accuracy_drop(),
            drift: None,
            safety_violations: None,
        }
    }
}

fn d_error_rate_ratio() -> Option<L<f64>> {
    Some(Located::new(2.0))
}
fn d_min_error_rate() -> Option<L<f64>> {
    Some(Located::new(0.005))
}
fn d_error_rate_max() -> Option<L<f64>> {
    Some(Located::new(0.05))
}
fn d_latency_p99_max() -> Option<L<String>> {
    Some(Located::new("500ms".into()))
}
fn d_latency_p99_ratio() -> Option<L<f64>> {
    Some(Located::new(1.5))
}
fn d_health_failures() -> Option<L<u32>> {
    Some(Located::new(3))
}
fn d_accuracy_drop() -> Option<L<f64>> {
    Some(Located::new(0.05))
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileDrift {
    /// `header:NAME` or `json:FIELD` (a top-level numeric field of the response body).
    pub signal: String,
    /// Deprecated, ignored by the sequential (anytime-valid) drift test, whose threshold
    /// comes from `evaluator.confidence`; still accepted so existing files load (default
    /// 0.05; above 0, below 1).
    #[serde(default)]
    pub p_value: Option<L<f64>>,
    /// Deprecated, ignored by the sequential (anytime-valid) drift test, which needs no
    /// run of significant checks; still accepted so existing files load (default 3; 1 to
    /// 1000).
    #[serde(default)]
    pub consecutive: Option<L<u32>>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSafety {
    /// Response header a guardrail sets on a flagged response.
    pub header: String,
    /// Flagged responses tolerated within `per` (0 to 1000000).
    pub max: L<u64>,
    /// The period flagged responses are counted over (1s to 7 days).
    pub per: L<String>,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileAlerts {
    #[serde(default)]
    pub webhooks: Vec<L<FileWebhook>>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileWebhook {
    pub url: String,
    #[serde(default)]
    pub min_severity: Option<Severity>,
}

/// Alert severity, lowest first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize, Serialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}
