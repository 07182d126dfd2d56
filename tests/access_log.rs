//! The access log (SPEC sections 3 and 7): its config keys, its writer (JSON lines with
//! every field, drops counted and never blocking, SIGUSR1 reopening a rotated file), its
//! reload, `rollgate check`'s line about it, and one line per proxied request.

#[macro_use]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use rollgate::config::{AccessLogConfig, AccessLogPath, Config, VersionName};
use rollgate::telemetry::access_log::{self, AccessEntry, AccessLog};
use serde_json::Value;

use support::*;

/// Every field SPEC section 7 names, Envoy's defaults first.
const FIELDS: [&str; 18] = [
    "start_time",
    "method",
    "path",
    "protocol",
    "code",
    "bytes_received",
    "bytes_sent",
    "duration_ms",
    "upstream_service_time_ms",
    "request_id",
    "authority",
    "upstream_host",
    "route",
    "version",
    "reason",
    "ttfb_ms",
    "grpc_status",
    "classification",
];

/// Tests that start a proxy with an access log take this: the access log is the process's,
/// so two at once would write to each other's files.
static PROCESS_LOG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn file_config(path: &Path) -> AccessLogConfig {
    AccessLogConfig {
        path: AccessLogPath::File(path.to_path_buf()),
        sample: 1.0,
    }
}

/// A complete entry, as the data plane fills it for an answered request.
fn entry(i: u64) -> AccessEntry {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, HeaderValue::from_static("api.example"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_str(&format!("req-{i}")).unwrap(),
    );
    let uri: Uri = "/v1/chat/completions?stream=true".parse().unwrap();
    let mut e = AccessEntry::from_request_head(
        SystemTime::now(),
        &Method::POST,
        &uri,
        Version::HTTP_2,
        &headers,
    );
    e.code = 200;
    e.bytes_received = 120;
    e.bytes_sent = 4096 + i;
    e.duration_ms = 250.5;
    e.upstream_service_time_ms = Some(12.25);
    e.upstream_host = Some("10.0.0.2:8000".parse().unwrap());
    e.route = Some(Arc::from("chat"));
    e.version = Some(VersionName::from("v2.5"));
    e.reason = Some("sticky");
    e.ttfb_ms = Some(40.125);
    e.grpc_status = Some(0);
    e.classification = "success";
    e
}

#[tokio::test]
async fn lines_are_json_objects_with_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let dropped = Counter::default();
    let log = AccessLog::new(&file_config(&path), dropped.clone()).unwrap();
    let before = SystemTime::now();
    for i in 0..3 {
        log.log(entry(i));
    }
    // An entry with nothing from an upstream: every field is still there, as null.
    log.log(AccessEntry::from_request_head(
        SystemTime::now(),
        &Method::GET,
        &"/healthz".parse().unwrap(),
        Version::HTTP_11,
        &HeaderMap::new(),
    ));
    log.flush().await;
    let got = json_lines(&path);
    assert_eq!(got.len(), 4, "{got:#?}");
    for l in &got {
        let obj = l.as_object().unwrap();
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), FIELDS.len(), "{l}");
        for f in FIELDS {
            assert!(obj.contains_key(f), "{f} missing: {l}");
        }
    }
    let l = &got[1];
    assert_eq!(l["method"], "POST");
    assert_eq!(l["path"], "/v1/chat/completions?stream=true");
    assert_eq!(l["protocol"], "HTTP/2");
    assert_eq!(l["code"], 200);
    assert_eq!(l["bytes_received"], 120);
    assert_eq!(l["bytes_sent"], 4097);
    assert_eq!(l["duration_ms"], 250.5);
    assert_eq!(l["upstream_service_time_ms"], 12.25);
    assert_eq!(l["request_id"], "req-1");
    assert_eq!(l["authority"], "api.example");
    assert_eq!(l["upstream_host"], "10.0.0.2:8000");
    assert_eq!(l["route"], "chat");
    assert_eq!(l["version"], "v2.5");
    assert_eq!(l["reason"], "sticky");
    assert_eq!(l["ttfb_ms"], 40.125);
    assert_eq!(l["grpc_status"], 0);
    assert_eq!(l["classification"], "success");
    // RFC 3339, milliseconds, UTC, as the audit log writes timestamps.
    let ts = l["start_time"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == "2026-11-22T14:35:23.101Z".len(),
        "{ts}"
    );
    let at = humantime::parse_rfc3339(ts).unwrap();
    assert!(at + Duration::from_secs(1) >= before, "{ts}");

    let bare = &got[3];
    assert_eq!(bare["path"], "/healthz");
    assert_eq!(bare["protocol"], "HTTP/1.1");
    for f in [
        "upstream_service_time_ms",
        "request_id",
        "authority",
        "upstream_host",
        "route",
        "version",
        "reason",
        "ttfb_ms",
        "grpc_status",
    ] {
        assert_eq!(bare[f], Value::Null, "{f}: {bare}");
    }
    assert_eq!(dropped.get(), 0);
}

/// On a current-thread runtime the writer cannot run while the test logs without yielding:
/// the channel fills and stays full, so exactly the overflow is dropped.
#[tokio::test(flavor = "current_thread")]
async fn a_full_channel_drops_and_counts_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let dropped = Counter::default();
    let log = AccessLog::with_capacity(&file_config(&path), dropped.clone(), 16).unwrap();
    let e = entry(7);
    let started = Instant::now();
    for _ in 0..10_000 {
        log.log(e.clone());
    }
    // Ten thousand calls against a writer that never runs: no call waited for it.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(dropped.get(), 10_000 - 16);
    log.flush().await;
    assert_eq!(json_lines(&path).len(), 16);
    // Once the writer caught up, entries go through again.
    log.log(e);
    log.flush().await;
    assert_eq!(json_lines(&path).len(), 17);
    assert_eq!(dropped.get(), 10_000 - 16);
}

#[tokio::test]
async fn the_metric_is_exported() {
    let telemetry = Arc::new(rollgate::telemetry::Telemetry::new(Duration::from_secs(30)));
    let metrics = rollgate::telemetry::prom::Metrics::new(telemetry);
    let dir = tempfile::tempdir().unwrap();
    let log = AccessLog::with_capacity(
        &file_config(&dir.path().join("a.log")),
        metrics.access_log_dropped.clone(),
        1,
    )
    .unwrap();
    log.log(entry(1));
    log.log(entry(2));
    let text = metrics.encode();
    assert!(
        text.contains("rollgate_access_log_dropped_total 1"),
        "{text}"
    );
    metrics
        .shadow_dropped
        .get_or_create(&rollgate::telemetry::prom::labels(&[
            ("route", "chat"),
            ("reason", "overloaded"),
        ]))
        .inc();
    let text = metrics.encode();
    assert!(
        text.contains("rollgate_shadow_dropped_total{route=\"chat\",reason=\"overloaded\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn sigusr1_reopens_a_renamed_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    // The SIGUSR1 handler is installed when the log is created, before any signal is sent
    // (without it, SIGUSR1 would end the test process).
    let log = AccessLog::new(&file_config(&path), Counter::default()).unwrap();
    log.log(entry(0));
    log.flush().await;
    std::fs::rename(&path, &rotated).unwrap();
    // Written after the rename, before the signal: still into the renamed file, as with
    // logrotate between its rename and its postrotate script.
    log.log(entry(1));
    log.flush().await;
    let status = std::process::Command::new("kill")
        .args(["-USR1", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The signal reaches the writer asynchronously: log until a line lands in a new file.
    let mut sent = 2u64;
    assert_eventually!(
        {
            log.log(entry(sent));
            sent += 1;
            log.flush().await;
            path.exists() && !json_lines(&path).is_empty()
        },
        Duration::from_secs(5),
        "no new file at {} after SIGUSR1",
        path.display()
    );
    let old = json_lines(&rotated);
    let new = json_lines(&path);
    assert_eq!(old[0]["request_id"], "req-0");
    assert_eq!(old[1]["request_id"], "req-1");
    assert_eq!(
        old.len() + new.len(),
        sent as usize,
        "no line lost or doubled"
    );
    assert_eq!(
        new.last().unwrap()["request_id"],
        format!("req-{}", sent - 1)
    );
}

#[tokio::test]
async fn sampled_follows_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = file_config(&dir.path().join("a.log"));
    let all = AccessLog::new(&config, Counter::default()).unwrap();
    assert!((0..1000).all(|_| all.sampled()));
    config.sample = 0.1;
    let some = AccessLog::new(&config, Counter::default()).unwrap();
    let n = (0..10_000).filter(|_| some.sampled()).count();
    assert!((700..1300).contains(&n), "{n} of 10000 at 0.1");
}

// --- config ---------------------------------------------------------------------------

const MINIMAL: &str = "versions:\n  a: {endpoints: [http://127.0.0.1:1]}\nroutes:\n  - name: r\n    baseline: a\n    split: {a: 1}\n";

/// The file's error text when `MINIMAL` plus `extra` (from line 7) is rejected.
fn rejected(extra: &str) -> String {
    let text = format!("{MINIMAL}{extra}");
    match Config::from_str(&text, Path::new("t.yaml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn access_log_defaults_to_off_and_stdout_at_full_rate() {
    let c = Config::from_str(MINIMAL, Path::new("t.yaml")).unwrap();
    assert_eq!(c.access_log, None);
    let c = Config::from_str(&format!("{MINIMAL}access_log: {{}}\n"), Path::new("t.yaml")).unwrap();
    assert_eq!(
        c.access_log,
        Some(AccessLogConfig {
            path: AccessLogPath::Stdout,
            sample: 1.0
        })
    );
    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("rollgate.yaml");
    let c = Config::from_str(
        &format!("{MINIMAL}access_log: {{path: logs/access.log, sample: 0.5}}\n"),
        &origin,
    );
    // The directory must exist: `logs/` does not yet.
    let e = c.unwrap_err().to_string();
    assert!(
        e.contains("access_log.path") && e.contains("does not exist"),
        "{e}"
    );
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let c = Config::from_str(
        &format!("{MINIMAL}access_log: {{path: logs/access.log, sample: 0.5}}\n"),
        &origin,
    )
    .unwrap();
    assert_eq!(
        c.access_log.unwrap(),
        AccessLogConfig {
            path: AccessLogPath::File(dir.path().join("logs/access.log")),
            sample: 0.5
        }
    );
}

#[test]
fn a_bad_sample_is_named_with_its_range() {
    for bad in ["0", "-0.5", "1.5", ".nan", "'half'"] {
        let e = rejected(&format!("access_log: {{path: stderr, sample: {bad}}}\n"));
        assert!(e.starts_with("t.yaml:7:"), "{bad}: {e}");
        assert!(e.contains("access_log.sample"), "{bad}: {e}");
    }
    let e = rejected("access_log: {sample: 2}\n");
    assert!(e.contains("must be a number in (0, 1]"), "{e}");
}

#[test]
fn a_bad_path_or_key_is_named() {
    let e = rejected("access_log: {file: /tmp/a.log}\n");
    assert!(
        e.starts_with("t.yaml:7:") && e.contains("access_log"),
        "{e}"
    );
    assert!(e.contains("file"), "{e}");
    let e = rejected("access_log: {path: ''}\n");
    assert!(
        e.starts_with("t.yaml:7:") && e.contains("access_log.path: path must not be empty"),
        "{e}"
    );
    let e = rejected("access_log: {path: /nonexistent-rollgate-dir/access.log}\n");
    assert!(
        e.contains("access_log.path") && e.contains("does not exist"),
        "{e}"
    );
    let e = rejected("access_log: {path: /}\n");
    assert!(
        e.contains("access_log.path") && e.contains("directory"),
        "{e}"
    );
}

#[test]
fn grpc_fault_codes_out_of_range_are_named() {
    let e = rejected("    grpc_fault_codes: [2, 14, 17]\n");
    assert!(
        e.contains("t.yaml:7:")
            && e.contains("routes[0].grpc_fault_codes[2]: 17 is out of range: must be an integer from 0 to 16"),
        "{e}"
    );
    let e = rejected("    grpc_fault_codes: [-1]\n");
    assert!(e.contains("routes[0].grpc_fault_codes"), "{e}");
    let e = rejected("    grpc_fault_codes: UNAVAILABLE\n");
    assert!(e.contains("routes[0].grpc_fault_codes"), "{e}");
    let c = Config::from_str(
        &format!("{MINIMAL}    grpc_fault_codes: [14]\n"),
        Path::new("t.yaml"),
    )
    .unwrap();
    assert_eq!(c.routes[0].grpc_fault_codes, 1 << 14);
    assert!(c.routes[0].is_grpc_fault(14) && !c.routes[0].is_grpc_fault(13));
    let c = Config::from_str(MINIMAL, Path::new("t.yaml")).unwrap();
    assert_eq!(
        c.routes[0].grpc_fault_codes,
        rollgate::config::DEFAULT_GRPC_FAULT_CODES
    );
}

#[test]
fn check_says_where_the_access_log_goes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollgate.yaml");
    let run = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rollgate"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let state = format!("state_dir: {}\n", dir.path().join("state").display());
    let out = run(&format!("{MINIMAL}{state}"));
    assert!(out.contains("\naccess_log off\n"), "{out}");
    let out = run(&format!(
        "{MINIMAL}{state}access_log: {{path: access.log, sample: 0.25}}\n"
    ));
    let want = format!(
        "access_log on: {}, sample 0.25",
        dir.path().join("access.log").display()
    );
    assert!(out.contains(&want), "{out}");
    assert!(
        !dir.path().join("access.log").exists(),
        "check creates no file"
    );
}

// --- with a proxy ---------------------------------------------------------------------

#[tokio::test]
async fn a_reload_replaces_the_access_log() {
    let _process_log = PROCESS_LOG.lock().await;
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::new()
        .version("v1", &up)
        .route(Route::new("chat", "v1"))
        .top("access_log: {path: first.log}")
        .start()
        .await;
    let dir = proxy.config_dir();
    let reloader = &proxy.running().reloader;
    let first = reloader.access_log().expect("access log on");
    assert_eq!(
        first.config().path,
        AccessLogPath::File(dir.join("first.log"))
    );
    assert!(dir.join("first.log").exists(), "opened at start");
    assert!(Arc::ptr_eq(&access_log::current().unwrap(), &first));

    let path = reloader.path().to_path_buf();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "access_log: {path: first.log}",
            "access_log: {path: second.log, sample: 0.5}",
        ),
    )
    .unwrap();
    let r = proxy.admin_post("/api/v1/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let second = reloader.access_log().expect("access log on");
    assert_eq!(
        *second.config(),
        AccessLogConfig {
            path: AccessLogPath::File(dir.join("second.log")),
            sample: 0.5
        }
    );
    assert!(Arc::ptr_eq(&access_log::current().unwrap(), &second));
    let record = proxy
        .audit_records()
        .into_iter()
        .rfind(|r| r["kind"] == "config_reload")
        .unwrap();
    assert_eq!(record["result"], "ok", "{record}");
    assert_eq!(record["access_log"]["sample"], 0.5, "{record}");
    assert!(record["restart_required"].is_null(), "{record}");

    // Off again with null.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "access_log: {path: second.log, sample: 0.5}",
            "access_log: null",
        ),
    )
    .unwrap();
    let r = proxy.admin_post("/api/v1/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(reloader.access_log().is_none());
    assert!(access_log::current().is_none());
    proxy.shutdown().await;
}

#[tokio::test]
async fn each_proxied_request_gets_one_line() {
    let _process_log = PROCESS_LOG.lock().await;
    let up = TestUpstream::start("v1").await;
    let proxy = proxy_with_access_log(&up, None).await;
    let path = proxy.config_dir().join("access.log");
    let client = TestClient::http1();
    let r = client
        .get_with(
            &proxy.url("/v1/models?limit=2"),
            &[("x-request-id", "e2e-1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = proxy.access_lines(&path, 1).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    let l = &got[0];
    for f in FIELDS {
        assert!(l.get(f).is_some(), "{f} missing: {l}");
    }
    assert_eq!(l["method"], "GET");
    assert_eq!(l["path"], "/v1/models?limit=2");
    assert_eq!(l["protocol"], "HTTP/1.1");
    assert_eq!(l["code"], 200);
    assert_eq!(l["request_id"], "e2e-1");
    assert_eq!(l["authority"], proxy.data_addr().to_string());
    assert_eq!(l["upstream_host"], up.addr().to_string());
    assert_eq!(l["route"], "chat");
    assert_eq!(l["version"], "v1");
    assert_eq!(l["reason"], "weight");
    assert_eq!(l["classification"], "success");
    assert_eq!(l["grpc_status"], Value::Null);
    assert_eq!(l["bytes_sent"].as_u64(), Some(r.body.len() as u64), "{l}");
    assert!(l["duration_ms"].as_f64().unwrap() > 0.0, "{l}");
    assert!(l["ttfb_ms"].as_f64().is_some(), "{l}");
    assert!(l["upstream_service_time_ms"].as_f64().is_some(), "{l}");
    proxy.shutdown().await;
}

/// Writes `raw` on a fresh connection and returns the status of the answer, reading until
/// the proxy closes. A write cut short by the proxy closing first (an oversized head) is
/// expected.
async fn status_of_raw(addr: std::net::SocketAddr, raw: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let head = String::from_utf8_lossy(&out);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"))
}

/// SPEC 7: one line per request, also for a head hyper refuses before rollgate's handler
/// sees it (malformed, too many header lines, a target or head over hyper's buffer): the
/// status hyper answered, what could not be parsed `null`, classified `refused`.
#[tokio::test]
async fn a_head_hyper_refuses_still_gets_its_line_with_the_status_it_was_answered() {
    let _process_log = PROCESS_LOG.lock().await;
    let up = TestUpstream::start("v1").await;
    let proxy = proxy_with_access_log(&up, None).await;
    let path = proxy.config_dir().join("access.log");
    let req = |target: &str, headers: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n")
    };
    let lines_of = |n: usize| -> String { (0..n).map(|i| format!("x-h{i}: v\r\n")).collect() };
    let cases = [
        (
            "a header line without a colon",
            req("/v1/x", "no colon\r\n"),
            400,
        ),
        ("a space in the target", req("/v1/a b", ""), 400),
        ("101 header lines", req("/v1/x", &lines_of(99)), 431),
        (
            "a 420 KB header",
            req("/v1/x", &format!("x-big: {}\r\n", "h".repeat(420_000))),
            431,
        ),
        (
            "a 70 KB target",
            req(&format!("/v1/{}", "t".repeat(70_000)), ""),
            414,
        ),
    ];
    let mut want = Vec::new();
    for (what, raw, status) in &cases {
        let got = status_of_raw(proxy.data_addr(), raw.as_bytes()).await;
        assert_eq!(got, *status, "{what}");
        want.push(got);
    }
    // And one the handler serves, so the count is exact.
    let r = TestClient::http1().get(&proxy.url("/v1/ok")).await;
    assert_eq!(r.status, 200);
    let got = proxy.access_lines(&path, cases.len() + 1).await;
    assert_eq!(got.len(), cases.len() + 1, "{got:#?}");
    let mut refused: Vec<u16> = got
        .iter()
        .filter(|l| l["code"] != 200)
        .map(|l| {
            for f in FIELDS {
                assert!(l.get(f).is_some(), "{f} missing: {l}");
            }
            assert_eq!(l["method"], Value::Null, "{l}");
            assert_eq!(l["path"], Value::Null, "{l}");
            assert_eq!(l["protocol"], "HTTP/1.1", "{l}");
            assert_eq!(l["classification"], "refused", "{l}");
            assert_eq!(l["route"], Value::Null, "{l}");
            assert!(l["start_time"].is_string(), "{l}");
            l["code"].as_u64().unwrap() as u16
        })
        .collect();
    refused.sort_unstable();
    want.sort_unstable();
    assert_eq!(refused, want);
    assert_eq!(
        up.requests().len(),
        1,
        "a refused head reached the upstream"
    );
    proxy.shutdown().await;
}
