//! The status page (`GET /` on the admin listener) in a real browser: headless Chromium against a
//! live proxy with traffic. The page must render the versions and weights, show a rollback
//! triggered through the admin API in its events, mark the version quarantined and see its
//! traffic stop; the test saves screenshots to `target/test-artifacts/`. A page opened after
//! the traffic stopped must show it anyway: the charts start from the proxy's history.
//!
//! Chromium is driven over the DevTools protocol on `--remote-debugging-pipe` (JSON messages
//! separated by NUL bytes on fds 3 and 4), so no new dependency is needed and the page runs in
//! real time: `--dump-dom --virtual-time-budget` would run the page's one-second polls back to
//! back in a few milliseconds of real time, so the request rates and charts it computes from
//! consecutive polls would be meaningless.
//!
//! Needs Chromium: `apt-get install -y chromium` (`.ci/run` installs it), or point
//! `ROLLGATE_CHROMIUM` at a Chrome or Chromium binary. Without one the test fails, saying so.

#[macro_use]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Upper bound for one DevTools call (the first one includes the browser's start).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for anything the page should show.
const PAGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Where screenshots and the browser's log go: `target/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent (the target dir)")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// `$ROLLGATE_CHROMIUM`, else the first Chromium or Chrome on `PATH`; fails the test if none.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("ROLLGATE_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the status page test needs headless Chromium and found none on PATH: install it with \
         `apt-get install -y chromium` (.ci/run does), or set ROLLGATE_CHROMIUM to a Chrome or \
         Chromium binary"
    );
}

/// One headless Chromium with one page, spoken to over `--remote-debugging-pipe`.
struct Browser {
    child: Child,
    to_browser: ChildStdin,
    from_browser: BufReader<ChildStdout>,
    next_id: u64,
    /// The page's session (flat mode): commands carrying it go to the page, not the browser.
    session: Option<String>,
    /// Uncaught exceptions and console or log errors the page produced (CSP violations too).
    page_errors: Vec<String>,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch(binary: &Path, log: PathBuf) -> Browser {
        let profile = tempfile::tempdir().expect("temp dir for the browser profile");
        let stderr = std::fs::File::create(&log).expect("create the browser log");
        // The DevTools pipe is fds 3 (to the browser) and 4 (from it); `sh` maps them onto the
        // child's stdin and stdout, which tokio gives us as pipes.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-pipe",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let to_browser = child.stdin.take().expect("browser stdin");
        let from_browser = BufReader::new(child.stdout.take().expect("browser stdout"));
        Browser {
            child,
            to_browser,
            from_browser,
            next_id: 0,
            session: None,
            page_errors: Vec::new(),
            log,
            _profile: profile,
        }
    }

    /// The last lines of the browser's stderr, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Sends one DevTools command (to the page once attached) and returns its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        let exchange = async {
            self.to_browser.write_all(&bytes).await?;
            self.to_browser.flush().await?;
            let mut buf = Vec::new();
            loop {
                buf.clear();
                if self.from_browser.read_until(0, &mut buf).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the browser closed the DevTools pipe",
                    ));
                }
                let reply: Value =
                    match serde_json::from_slice(buf.strip_suffix(&[0]).unwrap_or(&buf)) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                if reply["id"] == json!(id) {
                    return Ok(reply);
                }
                note_page_error(&mut self.page_errors, &reply);
            }
        };
        let reply = match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!(
                "DevTools {method}: {e}\n--- browser log ---\n{}",
                self.log_tail()
            ),
            Err(_) => panic!(
                "DevTools {method}: no answer within {CALL_TIMEOUT:?}\n--- browser log ---\n{}",
                self.log_tail()
            ),
        };
        if let Some(err) = reply.get("error") {
            panic!("DevTools {method} failed: {err}");
        }
        reply["result"].clone()
    }

    /// Opens `url` in a new page and attaches to it, reporting its errors from the start.
    async fn open(&mut self, url: &str) {
        let target = self
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        self.session = Some(
            attached["sessionId"]
                .as_str()
                .expect("sessionId")
                .to_string(),
        );
        self.call("Runtime.enable", json!({})).await;
        self.call("Log.enable", json!({})).await;
        self.call("Page.enable", json!({})).await;
        let nav = self.call("Page.navigate", json!({"url": url})).await;
        if let Some(e) = nav.get("errorText") {
            panic!("navigating to {url}: {e}");
        }
    }

    /// Evaluates `expression` in the page and returns its value (JSON-serializable).
    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("evaluating in the page threw: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// What the page shows, as plain data (see [`PAGE_STATE`]).
    async fn state(&mut self) -> Value {
        self.eval(PAGE_STATE).await
    }

    /// A PNG of the whole page at `width` CSS pixels.
    async fn screenshot(&mut self, width: u32, mobile: bool, path: &Path) {
        let metrics = |height: u64| json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile});
        self.call("Emulation.setDeviceMetricsOverride", metrics(900))
            .await;
        let height = self
            .eval("document.documentElement.scrollHeight")
            .await
            .as_u64()
            .unwrap_or(900)
            .clamp(400, 6000);
        self.call("Emulation.setDeviceMetricsOverride", metrics(height))
            .await;
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    async fn close(mut self) {
        self.session = None;
        // Browser.close may not answer before the pipe closes; the kill below covers that.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let msg = b"{\"id\":999999,\"method\":\"Browser.close\",\"params\":{}}\0";
            let _ = self.to_browser.write_all(msg).await;
            self.child.wait().await
        })
        .await;
        let _ = self.child.kill().await;
    }
}

/// Keeps the errors a page reports: uncaught exceptions, `console.error`, error log entries.
fn note_page_error(errors: &mut Vec<String>, event: &Value) {
    let p = &event["params"];
    match event["method"].as_str() {
        Some("Runtime.exceptionThrown") => errors.push(format!(
            "exception: {}",
            p["exceptionDetails"]["exception"]["description"]
                .as_str()
                .or(p["exceptionDetails"]["text"].as_str())
                .unwrap_or("?")
        )),
        Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
            errors.push(format!("console.error: {}", p["args"]))
        }
        Some("Log.entryAdded") if p["entry"]["level"] == "error" => errors.push(format!(
            "log ({}): {}",
            p["entry"]["source"].as_str().unwrap_or("?"),
            p["entry"]["text"].as_str().unwrap_or("?")
        )),
        _ => {}
    }
}

/// Standard base64 with padding, as DevTools sends screenshots.
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?}", c as char),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().take_while(|c| *c != b'=').collect();
        let mut n = 0u32;
        for (i, c) in data.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let take = data.len().saturating_sub(1);
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    out
}

/// Reads the page through the hooks `status.html` documents (data attributes, stable ids);
/// safe to run while the page is still loading.
const PAGE_STATE: &str = r#"(() => {
  const all = (sel) => [...document.querySelectorAll(sel)];
  return {
    url: location.href,
    conn: document.getElementById('conn')?.dataset.state ?? null,
    generation: document.body?.dataset.generation ?? null,
    routes: all('#routes tr[data-route]').map((r) => ({ name: r.dataset.route, state: r.dataset.state })),
    weights: Object.fromEntries(all('#routes [data-weight-version]')
      .map((w) => [w.dataset.weightVersion, Number(w.dataset.weight)])),
    roles: Object.fromEntries(all('#routes [data-weight-version]')
      .map((w) => [w.dataset.weightVersion, w.dataset.role])),
    shadowBadges: all('#routes [data-badge="shadow"]').map((b) => b.textContent),
    versions: Object.fromEntries(all('#versions tr[data-version]').map((r) => [r.dataset.version, {
      quarantined: r.dataset.quarantined === 'true',
      healthy: r.dataset.healthy === 'true',
      rate: r.querySelector('[data-rate]')?.dataset.rate ?? null,
      text: r.innerText,
    }])),
    samples: Object.fromEntries(all('#charts [data-chart-version]')
      .map((c) => [c.dataset.chartVersion, Number(c.dataset.samples)])),
    charted: Object.fromEntries(all('#charts [data-chart-version]')
      .map((c) => [c.dataset.chartVersion, { requests: Number(c.dataset.requests), errors: Number(c.dataset.errors) }])),
    quarantines: all('#quarantines [data-quarantined-version]').map((q) => q.dataset.quarantinedVersion),
    evidence: all('#evidence tr[data-evidence-version]').map((r) => ({
      version: r.dataset.evidenceVersion, rule: r.dataset.rule, ratio: Number(r.dataset.ratio) })),
    events: all('#events > li[data-id]').map((e) => ({
      kind: e.dataset.kind, id: e.dataset.id, from: e.dataset.fromVersion || null,
      to: e.dataset.toVersion || null, trigger: e.dataset.trigger || null, text: e.innerText,
    })),
  };
})()"#;

/// The request rate the page shows for `version`, if it has one yet.
fn rate(state: &Value, version: &str) -> Option<f64> {
    state["versions"][version]["rate"].as_str()?.parse().ok()
}

fn rollback_events<'s>(state: &'s Value, from: &str) -> Vec<&'s Value> {
    state["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["kind"] == "rollback" && e["from"] == from)
                .collect()
        })
        .unwrap_or_default()
}

/// The whole test, browser start to shutdown, stays under this.
const TEST_TIMEOUT: Duration = Duration::from_secs(55);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_page_shows_versions_and_a_rollback_in_a_real_browser() {
    let chromium = chromium();
    // On a timeout the scenario is dropped, and the browser with it (`kill_on_drop`).
    tokio::time::timeout(TEST_TIMEOUT, scenario(chromium))
        .await
        .unwrap_or_else(|_| panic!("the status page test took longer than {TEST_TIMEOUT:?}"));
}

async fn scenario(chromium: PathBuf) {
    let artifacts = artifacts_dir();

    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    stable.set_delay(Duration::from_millis(5));
    canary.set_delay(Duration::from_millis(20));
    canary.set(Reply::FailFraction(0.04));
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 80), ("canary", 20)]))
        .start()
        .await;

    // Steady traffic for the whole test, so rates, error rates and p99s have something to show.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, url, stop) = (
            TestClient::http1(),
            proxy.url("/v1/chat/completions"),
            stop.clone(),
        );
        load.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let req = request(Method::GET, &url).body(empty()).unwrap();
                let _ = client.try_send(req).await;
            }
        });
    }

    let mut browser = Browser::launch(&chromium, artifacts.join("status-page-chromium.log")).await;
    browser.open(&proxy.admin_url("/")).await;

    // (a) The versions render with their weights, and the page has measured some traffic.
    let mut page: Value;
    assert_eventually!(
        {
            page = browser.state().await;
            page["conn"] == "live"
                && page["weights"] == json!({"stable": 80, "canary": 20})
                && page["routes"] == json!([{"name": "chat", "state": "steady"}])
                && page["versions"]["stable"]["quarantined"] == false
                && page["versions"]["canary"]["quarantined"] == false
                && rate(&page, "stable").is_some_and(|r| r > 0.0)
                && rate(&page, "canary").is_some_and(|r| r > 0.0)
                && page["samples"]["canary"].as_u64() >= Some(5)
                // The distance to rollback: the canary's evidence per rule.
                && page["evidence"].as_array().is_some_and(|e| {
                    e.iter().any(|r| r["version"] == "canary" && r["rule"] == "error_rate_ratio")
                        && e.iter().all(|r| r["ratio"].as_f64().is_some_and(|x| x >= 0.0))
                })
        },
        PAGE_TIMEOUT,
        "the page never showed both versions live with traffic; it shows: {page:#}"
    );

    // (b) A manual rollback through the admin API.
    let r = TestClient::http1()
        .post_json(
            &proxy.admin_url("/api/v1/rollback"),
            r#"{"version":"canary","reason":"browser test","operator":"ci"}"#,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "POST /api/v1/rollback: {}", r.text());
    let record = r.json();
    let id = record["id"]
        .as_str()
        .expect("the rollback record has an id");

    // (c) The page shows it: the event, the quarantine, the weights, the route's state, and
    // canary's traffic stopping while stable's goes on.
    assert_eventually!(
        {
            page = browser.state().await;
            let events = rollback_events(&page, "canary");
            events.len() == 1
                && events[0]["id"] == id
                && events[0]["to"] == "stable"
                && events[0]["trigger"] == "manual"
                && events[0]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("browser test"))
                && page["versions"]["canary"]["quarantined"] == true
                && page["versions"]["stable"]["quarantined"] == false
                && page["quarantines"] == json!(["canary"])
                && page["weights"] == json!({"stable": 100, "canary": 0})
                && page["routes"] == json!([{"name": "chat", "state": "rolled_back"}])
                && rate(&page, "canary") == Some(0.0)
                && rate(&page, "stable").is_some_and(|r| r > 0.0)
                // A rolled-back version is no longer judged.
                && page["evidence"] == json!([])
        },
        PAGE_TIMEOUT,
        "the page never showed the rollback {id}; it shows: {page:#}"
    );
    assert_eq!(
        page["generation"],
        json!(record["generation_after"].to_string()),
        "the header shows the generation after the rollback"
    );

    // (d) Screenshots for people: desktop, then a phone's width.
    let desktop = artifacts.join("status-page.png");
    browser.screenshot(1280, false, &desktop).await;
    browser
        .screenshot(390, true, &artifacts.join("status-page-mobile.png"))
        .await;
    eprintln!("status page screenshot: {}", desktop.display());

    let errors = std::mem::take(&mut browser.page_errors);
    browser.close().await;
    stop.store(true, Ordering::Relaxed);
    while load.join_next().await.is_some() {}
    proxy.shutdown().await;
    assert!(
        errors.is_empty(),
        "the page reported errors (a CSP violation shows up here too):\n{}",
        errors.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_opened_after_the_traffic_shows_it_from_the_proxys_history() {
    let chromium = chromium();
    tokio::time::timeout(TEST_TIMEOUT, opened_late(chromium))
        .await
        .unwrap_or_else(|_| panic!("the late page test took longer than {TEST_TIMEOUT:?}"));
}

async fn opened_late(chromium: PathBuf) {
    let artifacts = artifacts_dir();
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    canary.set(Reply::FailFraction(0.25));
    // No retries: each failed canary answer is one request and one error on the canary.
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(
            Route::new("chat", "stable")
                .split(&[("stable", 70), ("canary", 30)])
                .with("retry: {non_idempotent: false}"),
        )
        .start()
        .await;

    // Four seconds of traffic, over before the page opens.
    let client = TestClient::http1();
    let mut tick = tokio::time::interval(Duration::from_millis(40));
    for _ in 0..100 {
        tick.tick().await;
        let req = request(Method::GET, &proxy.url("/v1/chat/completions"))
            .body(empty())
            .unwrap();
        let _ = client.try_send(req).await;
    }
    let (stable_n, canary_n) = (stable.request_count() as f64, canary.request_count() as f64);
    // The canary fails one request in four, spread evenly.
    let canary_errors = (canary_n / 4.0).floor();
    assert!(canary_n >= 8.0, "{canary_n} canary requests");

    let mut browser =
        Browser::launch(&chromium, artifacts.join("status-page-late-chromium.log")).await;
    browser.open(&proxy.admin_url("/")).await;
    let mut page: Value;
    assert_eventually!(
        {
            page = browser.state().await;
            let charted = &page["charted"];
            page["conn"] == "live"
                && charted["stable"]["requests"].as_f64() == Some(stable_n)
                && charted["canary"]["requests"].as_f64() == Some(canary_n)
                && charted["canary"]["errors"].as_f64().is_some_and(|e| (e - canary_errors).abs() <= 1.0)
                && charted["stable"]["errors"].as_f64() == Some(0.0)
                // The seconds of traffic, one point each, not one point per poll since the
                // page opened.
                && page["samples"]["canary"].as_u64() >= Some(4)
        },
        PAGE_TIMEOUT,
        "the page opened after the traffic never charted its {stable_n} stable and \
         {canary_n} canary requests; it shows: {page:#}"
    );
    browser
        .screenshot(1280, false, &artifacts.join("status-page-late.png"))
        .await;
    let errors = std::mem::take(&mut browser.page_errors);
    browser.close().await;
    proxy.shutdown().await;
    assert!(
        errors.is_empty(),
        "the page reported errors:\n{}",
        errors.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_version_is_shown_as_a_shadow() {
    let chromium = chromium();
    tokio::time::timeout(TEST_TIMEOUT, shadowed(chromium))
        .await
        .unwrap_or_else(|_| panic!("the shadow test took longer than {TEST_TIMEOUT:?}"));
}

async fn shadowed(chromium: PathBuf) {
    let artifacts = artifacts_dir();
    let stable = TestUpstream::start("stable").await;
    let mirror = TestUpstream::start("mirror").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("mirror", &mirror)
        .route(Route::new("chat", "stable").with("shadow: {version: mirror, percent: 25}"))
        .start()
        .await;

    // The API: the route names its shadow, and the member's role says so.
    let status = proxy.status_json().await;
    let route = &status["routes"][0];
    assert_eq!(
        route["shadow"],
        json!({"version": "mirror", "percent": 25, "active": true}),
        "{status:#}"
    );
    assert_eq!(
        route["members"],
        json!([
            {"version": "stable", "weight": 100, "role": "baseline"},
            {"version": "mirror", "weight": 0, "role": "shadow"},
        ]),
        "{status:#}"
    );
    let history = TestClient::http1()
        .get(&proxy.admin_url("/api/v1/history?version=mirror"))
        .await
        .json();
    assert_eq!(history["series"][0]["role"], "shadow", "{history:#}");

    // The page labels it.
    let mut browser =
        Browser::launch(&chromium, artifacts.join("status-page-shadow-chromium.log")).await;
    browser.open(&proxy.admin_url("/")).await;
    let mut page: Value;
    assert_eventually!(
        {
            page = browser.state().await;
            page["conn"] == "live"
                && page["roles"] == json!({"stable": "baseline", "mirror": "shadow"})
                && page["shadowBadges"] == json!(["shadow 25%"])
                && page["versions"]["mirror"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("shadow on chat (25% copied)"))
        },
        PAGE_TIMEOUT,
        "the page never showed mirror as the shadow; it shows: {page:#}"
    );
    let errors = std::mem::take(&mut browser.page_errors);
    browser.close().await;
    proxy.shutdown().await;
    assert!(
        errors.is_empty(),
        "the page reported errors:\n{}",
        errors.join("\n")
    );
}
