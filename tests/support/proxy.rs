//! `TestProxy`: the real rollgate library started in-process on 127.0.0.1:0 from a YAML config
//! the builder writes (and prints when the config is rejected).
//!
//! ```ignore
//! let proxy = TestProxy::new()
//!     .version("stable", &stable)
//!     .version("canary", &canary)
//!     .route(Route::new("chat", "stable").split(&[("stable", 90), ("canary", 10)]))
//!     .start()
//!     .await;
//! ```
//!
//! Defaults the builder adds: `state_dir` in a fresh temp dir, `drain_timeout: 2s`, and
//! `evaluator: {min_requests: 1000000}` so the evaluator never rolls a version back in the middle
//! of a data-plane test (override with `.top("evaluator: ...")`).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

use super::client::TestClient;
use super::metrics::metric_sum;
use super::upstream::TestUpstream;

/// One entry of `routes:`. Everything is written in YAML flow style.
#[derive(Clone, Debug)]
pub struct Route {
    name: String,
    baseline: String,
    split: Vec<(String, u32)>,
    matching: String,
    extra: Vec<String>,
}

impl Route {
    /// A route matching every path (`match: {path_prefix: /}`), all traffic on `baseline`.
    pub fn new(name: &str, baseline: &str) -> Route {
        Route {
            name: name.to_string(),
            baseline: baseline.to_string(),
            split: vec![(baseline.to_string(), 100)],
            matching: "{path_prefix: /}".to_string(),
            extra: Vec::new(),
        }
    }

    pub fn split(mut self, weights: &[(&str, u32)]) -> Route {
        self.split = weights.iter().map(|(v, w)| (v.to_string(), *w)).collect();
        self
    }

    /// The `match:` value in flow style, e.g. `{model: [gpt-a]}`.
    pub fn matching(mut self, flow: &str) -> Route {
        self.matching = flow.to_string();
        self
    }

    /// An extra `key: value` pair in flow style, e.g. `sticky: {header: x-user-id}`.
    pub fn with(mut self, flow_pair: &str) -> Route {
        self.extra.push(flow_pair.to_string());
        self
    }

    fn to_yaml(&self) -> String {
        let split: Vec<String> = self
            .split
            .iter()
            .map(|(v, w)| format!("{v}: {w}"))
            .collect();
        let mut pairs = vec![
            format!("name: {}", self.name),
            "owner: rollgate-tests".to_string(),
            format!("match: {}", self.matching),
            format!("baseline: {}", self.baseline),
            format!("split: {{{}}}", split.join(", ")),
        ];
        pairs.extend(self.extra.iter().cloned());
        format!("  - {{{}}}\n", pairs.join(", "))
    }
}

#[derive(Default)]
pub struct TestProxyBuilder {
    versions: Vec<(String, String)>,
    routes: Vec<Route>,
    top: Vec<String>,
    admin_token: Option<String>,
}

impl TestProxyBuilder {
    /// A version whose single endpoint is `upstream`'s `http://` URL.
    pub fn version(self, name: &str, upstream: &TestUpstream) -> Self {
        let endpoint = upstream.http_url();
        self.version_with(name, &endpoint, "")
    }

    /// A version with the given endpoint URL and extra flow-style pairs
    /// (e.g. `set_headers: {x-prompt-version: v2}`), which may be empty.
    pub fn version_with(mut self, name: &str, endpoint: &str, extra_flow: &str) -> Self {
        let mut body = format!("endpoints: [\"{endpoint}\"]");
        if !extra_flow.trim().is_empty() {
            body.push_str(", ");
            body.push_str(extra_flow);
        }
        self.versions.push((name.to_string(), body));
        self
    }

    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Protects the admin API's changes with bearer `token` (written to a token file).
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_string());
        self
    }

    /// Extra top-level YAML (block style, starting at column 0), e.g. `pin: {unknown: reject}`.
    pub fn top(mut self, yaml: &str) -> Self {
        self.top.push(yaml.trim_end().to_string());
        self
    }

    fn render(&self, state_dir: &std::path::Path) -> String {
        let mut y = String::new();
        y.push_str("listen: \"127.0.0.1:0\"\n");
        match &self.admin_token {
            Some(token) => {
                let file = state_dir.with_file_name("admin-token");
                std::fs::write(&file, format!("{token}\n")).unwrap();
                y.push_str(&format!(
                    "admin: {{listen: \"127.0.0.1:0\", token_file: \"{}\"}}\n",
                    file.display()
                ));
            }
            None if self.top.iter().any(|t| t.starts_with("admin:")) => {}
            None => y.push_str("admin: {listen: \"127.0.0.1:0\"}\n"),
        }
        y.push_str(&format!("state_dir: \"{}\"\n", state_dir.display()));
        y.push_str("drain_timeout: 2s\n");
        if !self.top.iter().any(|t| t.starts_with("evaluator:")) {
            y.push_str("evaluator: {min_requests: 1000000}\n");
        }
        for t in &self.top {
            y.push_str(t);
            y.push('\n');
        }
        y.push_str("versions:\n");
        for (name, body) in &self.versions {
            y.push_str(&format!("  {name}: {{{body}}}\n"));
        }
        y.push_str("routes:\n");
        for r in &self.routes {
            y.push_str(&r.to_yaml());
        }
        y
    }

    pub async fn start(self) -> TestProxy {
        assert!(
            !self.routes.is_empty(),
            "TestProxy needs at least one route"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let yaml = self.render(&state_dir);
        TestProxy::start_text(yaml, dir).await
    }
}

pub struct TestProxy {
    running: Option<rollgate::app::Running>,
    data_addr: SocketAddr,
    admin_addr: SocketAddr,
    yaml: String,
    admin: TestClient,
    _dir: tempfile::TempDir,
}

impl TestProxy {
    /// A proxy with one version `v1` at `url` and one route `chat` to it.
    pub async fn to(url: &str) -> TestProxy {
        TestProxy::new()
            .version_with("v1", url, "")
            .route(Route::new("chat", "v1"))
            .start()
            .await
    }

    #[allow(clippy::new_ret_no_self)] // the builder is the entry point, as `TestProxy::new().version(..)` reads
    pub fn new() -> TestProxyBuilder {
        TestProxyBuilder::default()
    }

    /// Starts from a complete YAML text; `{state_dir}` in it is replaced by a fresh temp dir.
    pub async fn from_yaml(yaml: &str) -> TestProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let yaml = yaml.replace("{state_dir}", &state_dir.display().to_string());
        TestProxy::start_text(yaml, dir).await
    }

    async fn start_text(yaml: String, dir: tempfile::TempDir) -> TestProxy {
        let path = dir.path().join("rollgate.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let config = rollgate::config::Config::from_str(&yaml, &path)
            .unwrap_or_else(|e| panic!("config rejected:\n{e}\n--- config ---\n{yaml}"));
        let data = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind data listener");
        let admin = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin listener");
        let listeners = rollgate::app::Listeners {
            data,
            admin,
            health: None,
        };
        let running = rollgate::app::start(config, listeners)
            .await
            .unwrap_or_else(|e| panic!("rollgate::app::start failed: {e}\n--- config ---\n{yaml}"));
        TestProxy {
            data_addr: running.data_addr,
            admin_addr: running.admin_addr,
            running: Some(running),
            yaml,
            admin: TestClient::http1(),
            _dir: dir,
        }
    }

    /// `http://DATA_ADDR{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.data_addr, path)
    }

    /// `http://ADMIN_ADDR{path}`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The running library instance (store, controller) for tests that act below the API.
    pub fn running(&self) -> &rollgate::app::Running {
        self.running.as_ref().expect("running")
    }

    /// The config file's directory: relative paths in the config (`access_log.path`)
    /// resolve there.
    pub fn config_dir(&self) -> std::path::PathBuf {
        self.running()
            .reloader
            .path()
            .parent()
            .expect("a config file has a directory")
            .to_path_buf()
    }

    /// The config text the proxy was started with.
    pub fn yaml(&self) -> &str {
        &self.yaml
    }

    /// GET /metrics on the admin listener (must answer 200).
    pub async fn metrics_text(&self) -> String {
        let r = self.admin.get(&self.admin_url("/metrics")).await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        r.text()
    }

    /// Sum of the samples of `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text().await, name, labels)
    }

    /// Requests recorded for `version`, every classification.
    pub async fn answered_by(&self, version: &str) -> f64 {
        self.metric("rollgate_requests_total", &[("version", version)])
            .await
    }

    /// Requests recorded for `version` with `classification`.
    pub async fn classified(&self, version: &str, class: &str) -> f64 {
        self.metric(
            "rollgate_requests_total",
            &[("version", version), ("classification", class)],
        )
        .await
    }

    /// The lines of the access log written to `path`, once the writer has flushed at least
    /// `at_least` of them (within 5 s).
    pub async fn access_lines(
        &self,
        path: &std::path::Path,
        at_least: usize,
    ) -> Vec<serde_json::Value> {
        let log = self.running().reloader.access_log().expect("access log on");
        assert_eventually!(
            {
                log.flush().await;
                json_lines(path).len() >= at_least
            },
            Duration::from_secs(5),
            "fewer than {at_least} lines in {}: {:#?}",
            path.display(),
            json_lines(path)
        );
        json_lines(path)
    }

    /// Every record of the audit log, oldest first.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        audit_records_in(self.running().controller.audit.path())
    }

    /// A JSON POST to the admin API.
    pub async fn admin_post(&self, path: &str, body: &str) -> crate::support::TestResponse {
        self.admin
            .post_json(&self.admin_url(path), body.to_string(), &[])
            .await
    }

    /// GET /api/v1/status (must answer 200 with JSON).
    pub async fn status_json(&self) -> serde_json::Value {
        let r = self.admin.get(&self.admin_url("/api/v1/status")).await;
        assert_eq!(r.status, 200, "GET /api/v1/status: {}", r.text());
        r.json()
    }

    /// Graceful stop; panics if it takes longer than 10 s.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(10), r.shutdown())
                .await
                .expect("rollgate shutdown did not finish within 10s");
        }
    }
}

/// Replaces `path` the way editors save: write a sibling temp file, then rename it over.
pub fn save_like_an_editor(path: &std::path::Path, text: &str) {
    let tmp = path.with_file_name(format!(
        "{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A proxy with one version `v1` (`up`) behind route `chat`, its access log in
/// `access.log` beside the config, and `extra` top-level config if any.
pub async fn proxy_with_access_log(up: &TestUpstream, extra: Option<&str>) -> TestProxy {
    let mut b = TestProxy::new()
        .version("v1", up)
        .route(Route::new("chat", "v1"))
        .top("access_log: {path: access.log}");
    if let Some(t) = extra {
        b = b.top(t);
    }
    b.start().await
}

/// The records of the audit log at `path` (none when it does not exist).
pub fn audit_records_in(path: &std::path::Path) -> Vec<serde_json::Value> {
    json_lines(path)
}

/// The JSON objects of a JSON-lines file (the audit log, the access log): none when it
/// does not exist; a line that is not JSON fails the test, naming it.
pub fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}
