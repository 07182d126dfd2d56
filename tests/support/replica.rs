//! `Replica`: one fleet member as users run it, the real `rollgate run` binary in a child
//! process, started from a YAML text written to its own temp dir.
//!
//! ```ignore
//! let redis = RedisServer::start().await;
//! let yaml = format!("fleet: {{store: \"{}\", name: f}}\nversions: ...\nroutes: ...", redis.url());
//! let a = Replica::start("a", &yaml).await;
//! let b = Replica::builder("b", &yaml).admin_token("t0k").start().await;
//! b.admin_post("/api/v1/rollback", r#"{"version": "canary"}"#).await;
//! ```
//!
//! What the harness adds to the text: `{state_dir}` and `{admin_token_file}` are replaced by
//! paths in the replica's temp dir; top-level keys it leaves out get `listen: 127.0.0.1:0`,
//! `admin: {listen: 127.0.0.1:0}` (with the token file when a token is set) and that
//! `state_dir`. The child gets `ROLLGATE_REPLICA=<name>`, `RUST_LOG=info`,
//! `ROLLGATE_WORKERS=2` (several replicas on one machine, each with a thread per CPU, would
//! oversubscribe it) and `--log-format json`; `.env(..)` overrides any of them.
//!
//! Addresses: the replica binds port 0 and the harness reads the ports from its
//! "rollgate serving" log line (so `RUST_LOG` must keep `rollgate::app` at info), then waits for
//! `GET /readyz` = 200 on the admin listener. stdout and stderr go to files in the temp dir
//! (appended across restarts) and are printed when the start fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::client::{request, TestClient, TestResponse};
use super::metrics::metric_sum;
use super::proxy::audit_records_in;

/// Bound on a start: from spawn to `/readyz` = 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on a graceful stop after SIGTERM (the drain included).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

pub struct ReplicaBuilder {
    name: String,
    yaml: String,
    admin_token: Option<String>,
    env: Vec<(String, String)>,
}

impl ReplicaBuilder {
    /// Protects the admin API's changes with bearer `token`: written to `{admin_token_file}`,
    /// used by the default `admin:` line, and sent by [`Replica::admin_post`].
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_string());
        self
    }

    /// An environment variable for the child (overrides the harness's defaults).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Writes the config, spawns the binary, waits until it is ready. Panics (with the
    /// child's output) when it exits or is not ready within [`READY_TIMEOUT`].
    pub async fn start(self) -> Replica {
        let dir = tempfile::tempdir().expect("temp dir for replica");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let token_file = dir.path().join("admin-token");
        if let Some(token) = &self.admin_token {
            std::fs::write(&token_file, format!("{token}\n")).unwrap();
        }
        let yaml = render(
            &self.yaml,
            &state_dir,
            &token_file,
            self.admin_token.is_some(),
        );
        let config_path = dir.path().join("rollgate.yaml");
        std::fs::write(&config_path, &yaml).unwrap();
        let mut replica = Replica {
            name: self.name,
            yaml,
            config_path,
            state_dir,
            admin_token: self.admin_token,
            env: self.env,
            child: None,
            data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            client: TestClient::http1(),
            dir,
        };
        replica.spawn_and_wait().await;
        replica
    }
}

/// Whether `yaml` sets top-level `key` (a line starting with `key:` at column 0).
fn has_top_key(yaml: &str, key: &str) -> bool {
    yaml.lines()
        .any(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
}

fn render(yaml: &str, state_dir: &Path, token_file: &Path, with_token: bool) -> String {
    let state = state_dir.display().to_string();
    let token = token_file.display().to_string();
    if has_top_key(yaml, "state_dir") && !yaml.contains("{state_dir}") {
        panic!(
            "Replica owns its state_dir: write `state_dir: \"{{state_dir}}\"` or leave it out\n\
             --- config ---\n{yaml}"
        );
    }
    let mut head = String::new();
    if !has_top_key(yaml, "listen") {
        head.push_str("listen: \"127.0.0.1:0\"\n");
    }
    if !has_top_key(yaml, "admin") {
        if with_token {
            head.push_str(&format!(
                "admin: {{listen: \"127.0.0.1:0\", token_file: \"{token}\"}}\n"
            ));
        } else {
            head.push_str("admin: {listen: \"127.0.0.1:0\"}\n");
        }
    }
    if !has_top_key(yaml, "state_dir") {
        head.push_str(&format!("state_dir: \"{state}\"\n"));
    }
    let body = yaml
        .replace("{state_dir}", &state)
        .replace("{admin_token_file}", &token);
    head + &body
}

/// A `rollgate run` child process. Drop kills it.
pub struct Replica {
    name: String,
    yaml: String,
    config_path: PathBuf,
    state_dir: PathBuf,
    admin_token: Option<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    data_addr: SocketAddr,
    admin_addr: SocketAddr,
    client: TestClient,
    dir: tempfile::TempDir,
}

impl Replica {
    /// [`ReplicaBuilder`] for replica `name` (its `ROLLGATE_REPLICA`) from `yaml`.
    pub fn builder(name: &str, yaml: &str) -> ReplicaBuilder {
        ReplicaBuilder {
            name: name.to_string(),
            yaml: yaml.to_string(),
            admin_token: None,
            env: Vec::new(),
        }
    }

    /// Starts replica `name` from `yaml` with the defaults (see the module docs).
    pub async fn start(name: &str, yaml: &str) -> Replica {
        Replica::builder(name, yaml).start().await
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("stdout.log")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// Spawns the binary on the config file, reads its addresses from the "rollgate serving"
    /// line it logs after this spawn, then polls `/readyz` until 200.
    async fn spawn_and_wait(&mut self) {
        let open = |path: PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        };
        let stderr_path = self.stderr_path();
        // Only lines logged by this run count (the file is appended across restarts).
        let from = std::fs::metadata(&stderr_path).map_or(0, |m| m.len() as usize);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rollgate"));
        cmd.args(["--log-format", "json", "run", "-c"])
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env("ROLLGATE_REPLICA", &self.name)
            .env("RUST_LOG", "info")
            .env("ROLLGATE_WORKERS", "2");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(open(self.stdout_path())))
            .stderr(Stdio::from(open(stderr_path.clone())))
            .spawn()
            .expect("spawn rollgate");
        self.child = Some(child);

        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let (data, admin) = loop {
            let text = std::fs::read(&stderr_path).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            if let Some(addrs) = serving_addrs(&text) {
                break addrs;
            }
            self.fail_if_exited("before logging \"rollgate serving\"");
            if tokio::time::Instant::now() >= deadline {
                self.fail_start(&format!(
                    "no \"rollgate serving\" log line within {READY_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.data_addr = data;
        self.admin_addr = admin;

        let readyz = self.admin_url("/readyz");
        loop {
            let req = request(http::Method::GET, &readyz)
                .body(super::client::empty())
                .unwrap();
            let last = match self.client.try_send(req).await {
                Ok(r) if r.status == 200 => return,
                Ok(r) => format!("{} {}", r.status, r.text()),
                Err(e) => e,
            };
            self.fail_if_exited("before /readyz answered 200");
            if tokio::time::Instant::now() >= deadline {
                self.fail_start(&format!(
                    "GET /readyz not 200 within {READY_TIMEOUT:?} (last: {last})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fail_if_exited(&mut self, when: &str) {
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = status {
            self.child = None;
            self.fail_start(&format!("exited ({status}) {when}"));
        }
    }

    fn fail_start(&mut self, what: &str) -> ! {
        self.kill();
        panic!(
            "replica {}: {what}\n--- config ---\n{}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            self.name,
            self.yaml,
            self.stderr_text(),
            self.stdout_text()
        );
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://DATA_ADDR{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.data_addr, path)
    }

    /// `http://ADMIN_ADDR{path}`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// Of the current run (a restart picks new ports).
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The config text as written (placeholders replaced, defaults added).
    pub fn yaml(&self) -> &str {
        &self.yaml
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child has been started and not yet seen to exit.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    fn auth_header(&self) -> Option<String> {
        self.admin_token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// GET on the admin listener (with the bearer token when one is set).
    pub async fn admin_get(&self, path: &str) -> TestResponse {
        let auth = self.auth_header();
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        self.client.get_with(&self.admin_url(path), &headers).await
    }

    /// A JSON POST to the admin API (with the bearer token when one is set).
    pub async fn admin_post(&self, path: &str, json_body: &str) -> TestResponse {
        let auth = self.auth_header();
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        self.client
            .post_json(&self.admin_url(path), json_body.to_string(), &headers)
            .await
    }

    /// GET /api/v1/status (must answer 200 with JSON).
    pub async fn status_json(&self) -> serde_json::Value {
        let r = self.admin_get("/api/v1/status").await;
        assert_eq!(
            r.status,
            200,
            "replica {}: GET /api/v1/status: {}",
            self.name,
            r.text()
        );
        r.json()
    }

    /// GET /metrics on the admin listener (must answer 200).
    pub async fn metrics_text(&self) -> String {
        let r = self.admin_get("/metrics").await;
        assert_eq!(
            r.status,
            200,
            "replica {}: GET /metrics: {}",
            self.name,
            r.text()
        );
        r.text()
    }

    /// Sum of the samples of `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text().await, name, labels)
    }

    /// Every record of the replica's audit log (`state_dir/audit.jsonl`), oldest first.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        audit_records_in(&self.state_dir.join("audit.jsonl"))
    }

    /// SIGKILL (a crash, an OOM kill) and reap. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (the drain included) and returns its status. Panics
    /// (after a SIGKILL) when it takes longer than [`STOP_TIMEOUT`], or when not running.
    pub async fn stop(&mut self) -> ExitStatus {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("replica {}: stop() when not running", self.name));
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("try_wait on rollgate") {
                self.child = None;
                return status;
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill();
                panic!(
                    "replica {}: did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- stderr ---\n{}",
                    self.name,
                    self.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the same replica again (same name, config and state_dir; new ports), killing it
    /// first if it still runs: a pod restarted in place.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn_and_wait().await;
    }

    /// Everything the replica logged so far (all runs).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self.stdout_path()).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The data and admin addresses from a "rollgate serving" JSON log line in `text`.
fn serving_addrs(text: &str) -> Option<(SocketAddr, SocketAddr)> {
    text.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let field = |k: &str| v["fields"][k].as_str().or_else(|| v[k].as_str());
        if field("message")? != "rollgate serving" {
            return None;
        }
        Some((
            field("data_addr")?.parse().ok()?,
            field("admin_addr")?.parse().ok()?,
        ))
    })
}
