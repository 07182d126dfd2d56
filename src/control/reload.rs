//! Config reload: the same pipeline as `rollgate check`, then one table swap with the
//! runtime state carried over. Triggered by a change in the config file's directory
//! (debounced; a Kubernetes ConfigMap swaps its `..data` symlink, editors rename on save),
//! by SIGHUP, and by `POST /api/v1/reload`.
//!
//! An invalid file changes nothing: the old table keeps serving, the error (file, line,
//! column, key) is logged, counted in `rollgate_config_reloads_total{result="error"}` and
//! written as a `config_reload` audit record. TLS certificates are re-read on every reload
//! and on changes in their directories; a bad PEM keeps the old certificate.
//!
//! A reload that changes `access_log` starts the new access log (its file opened, or the
//! reload refused if it cannot be) and installs it once the new table serves: the new path
//! and sample rate apply to the next request; the old log writes the lines it holds and
//! closes. `access_log: null` turns it off. No restart is needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use notify::{RecursiveMode, Watcher};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::admin::read_token;
use crate::config::{content_hash, Config};
use crate::evaluator::Controller;
use crate::proxy::server::CertStore;
use crate::telemetry::access_log::{self, AccessLog};
use crate::telemetry::prom::labels;

/// How long the directory must stay quiet before a watched change is applied. Long enough
/// to coalesce the burst of events of one save or one ConfigMap `..data` swap (a few ms
/// apart), short enough that a rename serves the new table well within 100 ms.
pub const DEBOUNCE: Duration = Duration::from_millis(40);
/// How long a reload may take to read the config file. A read that hangs (a FIFO, a stuck
/// network volume) fails the reload instead of holding every later one behind it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What started a reload (the `cause` of its audit record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Watch,
    Signal,
    Api,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Watch => "file_change",
            Cause::Signal => "sighup",
            Cause::Api => "api",
        }
    }
}

/// A reload that was refused: the audit record and the error text.
#[derive(Debug)]
pub struct Rejected {
    pub record: Value,
    pub error: String,
}

/// Why [`Reloader::reload`] has no record to answer with.
#[derive(Debug)]
pub enum ReloadError {
    /// The file was refused; the old table keeps serving.
    Rejected(Rejected),
    /// The new table serves, but its `config_reload` record could not be written: `record`
    /// holds the fields it would have had (restart-only keys, TLS errors, overrides dropped).
    Unrecorded {
        generation: u64,
        error: String,
        record: Map<String, Value>,
    },
    /// The reload did not run to an answer: the process is shutting down ([`Reloader::close`]),
    /// or its task failed.
    Interrupted(String),
}

impl From<Rejected> for ReloadError {
    fn from(r: Rejected) -> Self {
        ReloadError::Rejected(r)
    }
}

/// Reloads the config file a running rollgate was started from.
#[derive(Debug)]
pub struct Reloader {
    controller: Arc<Controller>,
    certs: Option<Arc<CertStore>>,
    path: PathBuf,
    /// SHA-256 of the admin bearer token, re-read from `admin.token_file` on each reload.
    pub admin_token: ArcSwapOption<[u8; 32]>,
    /// Hash of the last file content a watched change tried and failed to load, so one
    /// broken edit gives one error record, not one per unrelated event.
    last_failed: Mutex<Option<String>>,
    /// The access log this instance started and installed (see [`access_log::install`]).
    /// Its lock is cold: taken at start, on a reload and at shutdown.
    access_log: Mutex<Option<Arc<AccessLog>>>,
    /// One reload at a time, from reading the file to the record: a reload that read the
    /// file before an edit must not apply that text after one that read the edit.
    turn: tokio::sync::Mutex<()>,
    /// Set by [`close`](Self::close): reloads refuse to start.
    closed: AtomicBool,
}

/// Config keys whose change needs a restart: reported, not applied.
fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.listen != new.listen {
        keys.push("listen");
    }
    if old.admin.listen != new.admin.listen {
        keys.push("admin.listen");
    }
    if old.health_listen != new.health_listen {
        keys.push("health_listen");
    }
    if old.state_dir != new.state_dir {
        keys.push("state_dir");
    }
    if old.tls.is_some() != new.tls.is_some() {
        keys.push("tls");
    }
    if old.evaluator.interval != new.evaluator.interval {
        keys.push("evaluator.interval");
    }
    if old.evaluator.window != new.evaluator.window {
        keys.push("evaluator.window");
    }
    if old.drain_timeout != new.drain_timeout {
        keys.push("drain_timeout");
    }
    if old.fleet != new.fleet {
        keys.push("fleet");
    }
    keys
}

impl Reloader {
    /// Reads the admin token file now: a start-up error if it is unreadable or empty.
    pub fn new(
        controller: Arc<Controller>,
        certs: Option<Arc<CertStore>>,
    ) -> std::io::Result<Self> {
        let config = controller.store.config();
        let token = config
            .admin
            .token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        Ok(Reloader {
            path: config.source.clone(),
            controller,
            certs,
            admin_token: ArcSwapOption::from(token.map(Arc::new)),
            last_failed: Mutex::new(None),
            access_log: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
        })
    }

    /// At shutdown: no reload starts from now on, and one under way (its swap, record,
    /// count, alert, access log and token) finishes first, within `timeout`. A reload runs
    /// in a task of its own, which nothing else waits for.
    pub async fn close(&self, timeout: Duration) {
        self.closed.store(true, Ordering::Release);
        if tokio::time::timeout(timeout, self.turn.lock())
            .await
            .is_err()
        {
            tracing::error!(?timeout, "a config reload was still running at shutdown");
        }
    }

    /// The access log this instance serves with, if one is on.
    pub fn access_log(&self) -> Option<Arc<AccessLog>> {
        self.access_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes `log` this instance's access log and the process's ([`access_log::install`]).
    /// Not once [`close`](Self::close) has begun: shutdown takes the log after it, and one
    /// installed later would be flushed and removed by nobody.
    pub fn set_access_log(&self, log: Option<Arc<AccessLog>>) {
        let mut slot = self.access_log.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        match (&log, slot.as_ref()) {
            (Some(_), _) => access_log::install(log.clone()),
            (None, Some(old)) => access_log::uninstall(old),
            (None, None) => {}
        }
        *slot = log;
    }

    /// Turns this instance's access log off and returns it (shutdown flushes it).
    pub fn take_access_log(&self) -> Option<Arc<AccessLog>> {
        let log = self
            .access_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(l) = &log {
            access_log::uninstall(l);
        }
        log
    }

    /// Re-reads the token file; a broken file keeps the old token.
    fn refresh_token(&self, config: &Config) {
        match &config.admin.token_file {
            None => self.admin_token.store(None),
            Some(p) => match read_token(p) {
                Ok(t) => self.admin_token.store(Some(Arc::new(t))),
                Err(e) => tracing::error!(error = %e, "keeping the previous admin token"),
            },
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn count(&self, result: &str) {
        let metrics = &self.controller.store.metrics;
        metrics
            .config_reloads
            .get_or_create(&labels(&[("result", result)]))
            .inc();
        metrics
            .config_last_reload_successful
            .set(i64::from(result == "ok"));
    }

    /// Re-reads the certificate and key; on failure the old pair keeps serving.
    fn reload_certs(&self, config: &Config) -> Option<String> {
        let (certs, files) = (self.certs.as_ref()?, config.tls.as_ref()?);
        match certs.reload(&files.cert, &files.key) {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(cert = %files.cert.display(), error = %e, "TLS certificate reload failed; the old certificate keeps serving");
                Some(e.to_string())
            }
        }
    }

    /// Reloads now. `Ok(None)`: a watched change that left the file as it was (certificates
    /// were still re-read). `Ok(Some(record))`: the new table serves.
    /// `Err(ReloadError::Rejected)`: nothing changed. `Err(ReloadError::Unrecorded)`: the
    /// new table serves (counted `ok`), but its audit record could not be written.
    ///
    /// The work runs in a task of its own, as a command's does
    /// ([`Controller::run_tracked`]): a caller that goes away (an admin client that
    /// disconnects or times out, which makes hyper drop its request) never leaves a new
    /// table serving without its record, count, alert, access log or admin token, and
    /// shutdown waits for it.
    pub async fn reload(self: &Arc<Self>, cause: Cause) -> Result<Option<Value>, ReloadError> {
        let this = self.clone();
        self.controller
            .run_tracked(async move { this.reload_now(cause).await })
            .await
            .unwrap_or_else(|e| Err(ReloadError::Interrupted(e)))
    }

    async fn reload_now(&self, cause: Cause) -> Result<Option<Value>, ReloadError> {
        let _turn = self.turn.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(ReloadError::Interrupted(
                "the process is shutting down".into(),
            ));
        }
        let path = self.path.clone();
        let read = tokio::time::timeout(
            READ_TIMEOUT,
            tokio::task::spawn_blocking(move || {
                let bytes = std::fs::read(&path);
                let parsed = match &bytes {
                    Ok(b) => match std::str::from_utf8(b) {
                        Ok(text) => Config::from_str(text, &path).map_err(|e| e.to_string()),
                        Err(_) => Err(format!("{}: the file is not UTF-8", path.display())),
                    },
                    Err(e) => Err(format!("{}: cannot read config file: {e}", path.display())),
                };
                (bytes.map(|b| content_hash(&b)).ok(), parsed)
            }),
        )
        .await;
        let (file_hash, parsed) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => (None, Err(format!("reload task failed: {e}"))),
            Err(_) => (
                None,
                Err(format!(
                    "{}: reading the config file took longer than {READ_TIMEOUT:?}",
                    self.path.display()
                )),
            ),
        };
        let old = self.controller.store.config();
        if cause == Cause::Watch {
            let unchanged = file_hash.as_deref() == Some(old.hash.as_str());
            let failed_before = file_hash.is_some()
                && *self.last_failed.lock().unwrap_or_else(|e| e.into_inner()) == file_hash;
            if unchanged || failed_before {
                // Something else in the watched directories changed: certificates, token.
                self.reload_certs(&old);
                self.refresh_token(&old);
                return Ok(None);
            }
        }
        let new = match parsed {
            Ok(c) => c,
            Err(error) => return Err(self.reject(cause, file_hash, error).await.into()),
        };
        // The admin listener stays bound where it is until restart: the token rule applies
        // to that address, not only to the one the new file names.
        if !old.admin.listen.ip().is_loopback() && new.admin.token_file.is_none() {
            let error = format!(
                "{}: admin.token_file: the admin API listens on non-loopback {} until restart; its token cannot be removed by a reload",
                self.path.display(),
                old.admin.listen
            );
            return Err(self.reject(cause, file_hash, error).await.into());
        }
        // Opened before anything changes, so a path that cannot be opened refuses the
        // whole reload.
        let new_access_log = if old.access_log != new.access_log {
            match &new.access_log {
                None => Some(None),
                Some(c) => {
                    let dropped = self.controller.store.metrics.access_log_dropped.clone();
                    match AccessLog::new(c, dropped) {
                        Ok(l) => Some(Some(Arc::new(l))),
                        Err(e) => {
                            let error = format!("{}: {e}", self.path.display());
                            return Err(self.reject(cause, file_hash, error).await.into());
                        }
                    }
                }
            }
        } else {
            None
        };
        *self.last_failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let restart = restart_required(&old, &new);
        let tls_error = self.reload_certs(&new);
        let mut fields = Map::new();
        fields.insert("result".into(), json!("ok"));
        fields.insert("cause".into(), json!(cause.as_str()));
        fields.insert("source".into(), json!(self.path.display().to_string()));
        fields.insert("config_hash".into(), json!(new.hash));
        fields.insert("previous_hash".into(), json!(old.hash));
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "config reload: these keys change only on restart");
            fields.insert("restart_required".into(), json!(restart));
        }
        if let Some(e) = tls_error {
            fields.insert("tls_error".into(), json!(e));
        }
        if new_access_log.is_some() {
            let value = match &new.access_log {
                None => Value::Null,
                Some(c) => json!({"path": c.path.to_string(), "sample": c.sample}),
            };
            fields.insert("access_log".into(), value);
        }
        let hash = new.hash.clone();
        let done = match self.controller.reload(new, fields).await {
            Ok(done) => done,
            Err(e) => return Err(self.reject(cause, file_hash, e.to_string()).await.into()),
        };
        // The new table serves from here on: everything that goes with it follows, also
        // when its record could not be written.
        if let Some(log) = new_access_log {
            self.set_access_log(log);
        }
        self.count("ok");
        self.refresh_token(&self.controller.store.config());
        tracing::info!(config_hash = %hash, cause = cause.as_str(), generation = done.generation, "config reloaded");
        match done.record {
            Ok(record) => Ok(Some(record)),
            Err(unwritten) => Err(ReloadError::Unrecorded {
                generation: done.generation,
                error: unwritten.error.to_string(),
                record: unwritten.fields,
            }),
        }
    }

    async fn reject(&self, cause: Cause, file_hash: Option<String>, error: String) -> Rejected {
        self.count("error");
        tracing::error!(cause = cause.as_str(), %error, "config reload failed; the previous config keeps serving");
        *self.last_failed.lock().unwrap_or_else(|e| e.into_inner()) = file_hash;
        let mut fields = Map::new();
        fields.insert("result".into(), json!("error"));
        fields.insert("cause".into(), json!(cause.as_str()));
        fields.insert("source".into(), json!(self.path.display().to_string()));
        fields.insert("error".into(), json!(error));
        fields.insert(
            "generation".into(),
            json!(self.controller.store.load().generation),
        );
        let record = match self
            .controller
            .record_or_alert("config_reload", fields, None, None)
            .await
        {
            Ok(r) => r,
            Err(_) => Value::Null, // logged and alerted
        };
        Rejected { record, error }
    }
}

/// Watches the config file's directory (and the certificate directories) and reloads on
/// change, debounced; also reloads on SIGHUP. Runs until `stop` turns true.
pub fn spawn(reloader: Arc<Reloader>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut dirs = BTreeSet::new();
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dirs.insert(dir_of(reloader.path()));
    let config = reloader.controller.store.config();
    if let Some(tls) = &config.tls {
        dirs.insert(dir_of(&tls.cert));
        dirs.insert(dir_of(&tls.key));
    }
    if let Some(token) = &config.admin.token_file {
        dirs.insert(dir_of(token));
    }
    let watcher = {
        let tx = tx.clone();
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        })
    };
    let watcher = match watcher {
        Ok(mut w) => {
            for d in &dirs {
                if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot watch the directory; reload with SIGHUP or POST /api/v1/reload");
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file watching unavailable; reload with SIGHUP or POST /api/v1/reload");
            None
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher;
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<Option<()>>();
            let cause = tokio::select! {
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return;
                    }
                    continue;
                }
                _ = sighup => Cause::Signal,
                Some(()) = rx.recv() => Cause::Watch,
            };
            if cause == Cause::Watch {
                // Debounce: apply once the directory has been quiet for DEBOUNCE.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            }
            if let Err(ReloadError::Interrupted(why)) = reloader.reload(cause).await {
                tracing::warn!(cause = cause.as_str(), %why, "config reload not applied");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::alerts::Alerts;
    use crate::control::audit::Audit;
    use crate::routing::store::Store;
    use crate::routing::table::RuntimeState;
    use crate::telemetry::prom::Metrics;
    use crate::telemetry::Telemetry;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

    fn reloads(store: &Store, result: &'static str) -> u64 {
        store
            .metrics
            .config_reloads
            .get_or_create(&labels(&[("result", result)]))
            .get()
    }

    /// A webhook on `hook`: answers every request 200 and hands on its JSON body.
    fn webhook(hook: tokio::net::TcpListener) -> mpsc::UnboundedReceiver<Value> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((conn, _)) = hook.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut conn = tokio::io::BufReader::new(conn);
                    loop {
                        let mut len = 0;
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = line.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0; len];
                        if conn.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if conn.get_mut().write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        rx
    }

    async fn next_alert(alerts: &mut mpsc::UnboundedReceiver<Value>) -> Value {
        tokio::time::timeout(Duration::from_secs(10), alerts.recv())
            .await
            .expect("an alert within 10 s")
            .expect("the webhook is open")
    }

    /// The disk under `state_dir` fills after the table swapped: the new config serves, so
    /// everything says so (counted `ok`, last reload successful, the watcher not told the
    /// file failed); the missing record is an error of its own, logged and alerted.
    #[tokio::test]
    async fn a_reload_whose_record_cannot_be_written_still_reports_the_table_that_serves() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = dir.path().join("rollgate.yaml");
        let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook_addr = hook.local_addr().unwrap();
        let write = |split: &str| {
            let yaml = format!(
                "state_dir: {}\nalerts: {{webhooks: [{{url: \"http://{hook_addr}/hook\"}}]}}\n\
                 versions:\n  a: {{endpoints: [\"http://127.0.0.1:1\"]}}\n  b: {{endpoints: [\"http://127.0.0.1:2\"]}}\n\
                 routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: a, split: {split}}}\n",
                state.display()
            );
            std::fs::write(&path, yaml).unwrap();
        };
        write("{a: 100, b: 0}");
        let text = std::fs::read_to_string(&path).unwrap();
        let config = Config::from_str(&text, &path).unwrap();
        let telemetry = Arc::new(Telemetry::new(config.evaluator.window));
        let metrics = Arc::new(Metrics::new(telemetry.clone()));
        let store =
            Arc::new(Store::new(config, RuntimeState::default(), telemetry, metrics).unwrap());
        let audit = Arc::new(Audit::open(&state).unwrap());
        let controller = Arc::new(Controller::new(
            store.clone(),
            audit.clone(),
            Alerts::new().unwrap(),
            state.clone(),
        ));
        let reloader = Arc::new(Reloader::new(controller.clone(), None).unwrap());

        write("{a: 90, b: 10}");
        let record = reloader.reload(Cause::Api).await.unwrap().unwrap();
        assert_eq!(record["result"], "ok");
        assert_eq!(reloads(&store, "ok"), 1);

        audit.fail_writes();
        write("{a: 50, b: 50}");
        let before = store.load().generation;
        let hash = content_hash(&std::fs::read(&path).unwrap());
        match reloader.reload(Cause::Api).await {
            Err(ReloadError::Unrecorded {
                generation,
                error,
                record,
            }) => {
                assert!(generation > before, "{generation} after {before}");
                assert_eq!(generation, store.load().generation);
                assert!(error.contains("space"), "{error}");
                assert_eq!(record["config_hash"], json!(hash));
                assert_eq!(record["generation_after"], json!(generation));
            }
            other => panic!("expected an unrecorded reload, got {other:?}"),
        }
        assert_eq!(store.config().hash, hash, "the new file serves");
        assert_eq!(reloads(&store, "ok"), 2);
        assert_eq!(reloads(&store, "error"), 0);
        assert_eq!(store.metrics.config_last_reload_successful.get(), 1);
        assert!(
            reloader.last_failed.lock().unwrap().is_none(),
            "a watched event for this file must not be skipped as a failed one"
        );

        // The alert, to the webhook of the config that now serves, with the record that
        // could not be written.
        let mut alerts = webhook(hook);
        let alert = next_alert(&mut alerts).await;
        assert_eq!(alert["kind"], "audit_failed", "{alert}");
        assert_eq!(alert["severity"], "critical", "{alert}");
        assert_eq!(alert["record_kind"], "config_reload", "{alert}");
        assert_eq!(alert["record"]["result"], "ok", "{alert}");
        assert_eq!(alert["record"]["config_hash"], json!(hash), "{alert}");

        // A file refused while the disk is still full: nothing changes, and the lost
        // record of the refusal is alerted too.
        std::fs::write(&path, "versions: [").unwrap();
        let serving = store.load().generation;
        match reloader.reload(Cause::Api).await {
            Err(ReloadError::Rejected(r)) => assert_eq!(r.record, Value::Null),
            other => panic!("expected a rejected reload, got {other:?}"),
        }
        assert_eq!(store.load().generation, serving);
        assert_eq!(reloads(&store, "error"), 1);
        let alert = next_alert(&mut alerts).await;
        assert_eq!(alert["kind"], "audit_failed", "{alert}");
        assert_eq!(alert["record_kind"], "config_reload", "{alert}");
        assert_eq!(alert["record"]["result"], "error", "{alert}");

        // A command whose record fails: refused as applied-but-unrecorded, and alerted the
        // same way, with its id.
        let cmd = crate::decision::Command::new(
            crate::decision::Action::Pause {
                route: "chat".into(),
                paused: true,
            },
            None,
            None,
        );
        let id = cmd.id.clone();
        let answer = controller.apply(cmd).await;
        assert!(
            matches!(&answer, Err(crate::decision::Refused::Failed(d)) if d.contains("applied")),
            "{answer:?}"
        );
        let alert = next_alert(&mut alerts).await;
        assert_eq!(alert["kind"], "audit_failed", "{alert}");
        assert_eq!(alert["record_kind"], "pause", "{alert}");
        assert_eq!(alert["command_id"], json!(id), "{alert}");
        assert_eq!(alert["record"]["route"], "chat", "{alert}");
        controller.finish(Duration::from_secs(5)).await;
    }
}
