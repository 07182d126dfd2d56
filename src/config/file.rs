//! Raw config structs, exactly as written in the file.
//!
//! Every struct denies unknown keys. Leaf values whose meaning is checked later (durations,
//! addresses, version references) are wrapped in [`Located`], so `validate` can point at the
//! line and column they came from. Nothing here is trusted: [`super::validate`] turns a
//! [`FileConfig`] into a [`super::Config`] or a list of located problems.

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
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default)]
    pub drain_timeout: Option<L<String>>,
    /// Requests in flight through the data plane before new ones get 503 + Retry-After.
    #[serde(default)]
    pub max_in_flight: Option<u64>,
    pub versions: BTreeMap<String, L<FileVersion>>,
    pub routes: Vec<L<FileRoute>>,
    #[serde(default)]
    pub pin: FilePin,
    #[serde(default)]
    pub evaluator: FileEvaluator,
    #[serde(default)]
    pub alerts: FileAlerts,
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
    pub path: String,
    #[serde(default)]
    pub interval: Option<L<String>>,
    #[serde(default)]
    pub timeout: Option<L<String>>,
    #[serde(default)]
    pub unhealthy_after: Option<u32>,
    #[serde(default)]
    pub healthy_after: Option<u32>,
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
    /// Integer weights; weight-0 versions stay pinnable.
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
    #[serde(default)]
    pub max_request_body: Option<L<String>>,
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
    pub version: String,
    pub percent: u32,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRollout {
    pub steps: Vec<u32>,
    pub hold: L<String>,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    #[serde(default)]
    pub connect: Option<L<String>>,
    #[serde(default)]
    pub first_byte: Option<L<String>>,
    #[serde(default)]
    pub idle: Option<L<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRetry {
    #[serde(default)]
    pub budget_percent: Option<u32>,
    #[serde(default)]
    pub min_per_second: Option<u32>,
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
    #[serde(default)]
    pub interval: Option<L<String>>,
    #[serde(default)]
    pub window: Option<L<String>>,
    #[serde(default)]
    pub min_requests: Option<u64>,
    #[serde(default)]
    pub confidence: Option<L<f64>>,
    #[serde(default)]
    pub rules: FileRules,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileRules {
    #[serde(default = "d_error_rate_ratio")]
    pub error_rate_ratio: Option<L<f64>>,
    #[serde(default = "d_error_rate_max")]
    pub error_rate_max: Option<L<f64>>,
    #[serde(default = "d_latency_p99_max")]
    pub latency_p99_max: Option<L<String>>,
    #[serde(default = "d_latency_p99_ratio")]
    pub latency_p99_ratio: Option<L<f64>>,
    #[serde(default = "d_health_failures")]
    pub health_failures: Option<u32>,
    #[serde(default = "d_accuracy_drop")]
    pub accuracy_drop: Option<L<f64>>,
    #[serde(default)]
    pub drift: Option<L<FileDrift>>,
    #[serde(default)]
    pub safety_violations: Option<L<FileSafety>>,
}

impl Default for FileRules {
    fn default() -> Self {
        FileRules {
            error_rate_ratio: d_error_rate_ratio(),
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
fn d_error_rate_max() -> Option<L<f64>> {
    Some(Located::new(0.05))
}
fn d_latency_p99_max() -> Option<L<String>> {
    Some(Located::new("500ms".into()))
}
fn d_latency_p99_ratio() -> Option<L<f64>> {
    Some(Located::new(1.5))
}
fn d_health_failures() -> Option<u32> {
    Some(3)
}
fn d_accuracy_drop() -> Option<L<f64>> {
    Some(Located::new(0.05))
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileDrift {
    /// `header:NAME` or `json:FIELD` (a top-level numeric field of the response body).
    pub signal: String,
    #[serde(default)]
    pub p_value: Option<f64>,
    #[serde(default)]
    pub consecutive: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSafety {
    pub header: String,
    pub max: u64,
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
