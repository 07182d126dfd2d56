//! `rollgate demo`: the whole product in one command, no files (SPEC §9).
//!
//! Two in-process mock models (a stable version and a canary), the proxy on an embedded
//! config, and a closed-loop load generator. A few seconds in, the canary starts failing (or
//! slowing down, with `--fault latency`); the evaluator rolls it back; a live view shows
//! per-version traffic, errors, p99 and weights, and the summary reports time to detect,
//! trip-to-swap and client-visible errors, read from the proxy's own audit record.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;

use crate::app::{self, Listeners};
use crate::config::Config;
use crate::load::Load;
use crate::mock::{self, MockModel, MockOptions};

const STABLE: &str = "v1-stable";
const CANARY: &str = "v2-canary";
/// Concurrent clients of the load generator.
const CLIENTS: usize = 8;

/// The fault the canary develops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 30 % of its answers become 500s.
    Error,
    /// Its time to first byte goes from ~10 ms to 800 ms.
    Latency,
}

/// Options of `rollgate demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub fault: Fault,
    /// Total run time (the fault starts at a third of it, at most 4 s in).
    pub duration: Duration,
}

/// What happened, for the summary and for tests.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub requests: u64,
    pub client_errors: u64,
    /// Since the fault began, when the canary left the routing table.
    pub time_to_detect: Option<Duration>,
    /// The `rollback` audit record.
    pub rollback: Option<Value>,
    /// Requests the canary answered after the rollback was swapped in (in flight at the swap).
    pub canary_after_rollback: u64,
    pub state_dir: PathBuf,
}

const CONFIG: &str = r#"# rollgate demo: the embedded config.
listen: 127.0.0.1:0
admin: {listen: 127.0.0.1:0}
state_dir: ./state
drain_timeout: 2s
versions:
  v1-stable:
    endpoints: ["http://STABLE_ADDR"]
    bundle: {model: demo-7b-2026-10, prompt: support-v14, policy: guardrails-v3}
    last_verified: 2026-11-01
  v2-canary:
    endpoints: ["http://CANARY_ADDR"]
    bundle: {model: demo-7b-2026-11, prompt: support-v15, policy: guardrails-v3}
routes:
  - name: chat
    owner: demo-team
    match: {path_prefix: /v1/}
    baseline: v1-stable
    split: {v1-stable: 90, v2-canary: 10}
evaluator:
  interval: 100ms
  window: 30s
  min_requests: 50
  confidence: 0.99
  rules:
    latency_p99_max: 500ms
"#;

/// Runs the demo, printing to stdout. Returns the summary; `Err` only if it could not start.
pub async fn run(opts: DemoOptions) -> std::io::Result<DemoSummary> {
    let out = &mut std::io::stdout();
    let tty = out.is_terminal();
    let dir = std::env::temp_dir().join(format!("rollgate-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    // Two mock models.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut addrs = Vec::new();
    let mut models = Vec::new();
    for name in [STABLE, CANARY] {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        let model = MockModel::new(MockOptions {
            latency: Duration::from_millis(10),
            ..MockOptions::named(name)
        })
        .map_err(std::io::Error::other)?;
        models.push(model.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(mock::serve(listener, model, async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    let canary = models[1].clone();

    // The proxy, on the embedded config written next to its state.
    let text = CONFIG
        .replace("STABLE_ADDR", &addrs[0].to_string())
        .replace("CANARY_ADDR", &addrs[1].to_string());
    let path = dir.join("rollgate-demo.yaml");
    std::fs::write(&path, &text)?;
    let config = Config::from_str(&text, &path).map_err(std::io::Error::other)?;
    let listeners = Listeners {
        data: TcpListener::bind("127.0.0.1:0").await?,
        admin: TcpListener::bind("127.0.0.1:0").await?,
        health: None,
    };
    let running = app::start(config, listeners).await?;
    let url = format!("http://{}/v1/chat/completions", running.data_addr);
    let _ = writeln!(
        out,
        "rollgate demo: proxy on {} (admin http://{}), {STABLE} at 90 %, {CANARY} at 10 %, {} clients",
        running.data_addr, running.admin_addr, CLIENTS
    );

    // Load.
    let mut load = Load::start(&url, CLIENTS, CANARY)?;

    // Watch the table for the swap, precisely (an ArcSwap load every 2 ms).
    let started = Instant::now();
    let fault_at = (opts.duration / 3).min(Duration::from_secs(4));
    let store = running.store.clone();
    let mut swapped_at = tokio::spawn({
        let store = store.clone();
        async move {
            loop {
                if store
                    .load()
                    .version(&CANARY.into())
                    .is_some_and(|v| v.quarantined)
                {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });

    let mut view = View::new(tty, started);
    let mut fault_started: Option<Instant> = None;
    let mut swapped: Option<Instant> = None;
    let mut canary_at_swap = 0;
    let tick = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(1)
    };
    let mut next = started + tick;
    while started.elapsed() < opts.duration {
        tokio::time::sleep_until(next.into()).await;
        next += tick;
        let t = started.elapsed();
        if fault_started.is_none() && t >= fault_at {
            fault_started = Some(Instant::now());
            match opts.fault {
                Fault::Error => canary.set_error_rate(0.3),
                Fault::Latency => canary.set_latency(Duration::from_millis(800)),
            }
            view.event(
                t,
                &format!(
                    "{CANARY} starts {}",
                    match opts.fault {
                        Fault::Error => "failing 30 % of its requests",
                        Fault::Latency => "answering after 800 ms",
                    }
                ),
            );
        }
        if swapped.is_none() && swapped_at.is_finished() {
            let at = (&mut swapped_at).await.ok();
            swapped = at;
            canary_at_swap = canary.requests();
            let detect = match (fault_started, at) {
                (Some(f), Some(s)) => format!(
                    " (detected {} ms after the fault began)",
                    s.saturating_duration_since(f).as_millis()
                ),
                _ => String::new(),
            };
            view.event(
                t,
                &format!(
                    "ROLLBACK: {CANARY} -> {STABLE}, its traffic is back on the baseline{detect}"
                ),
            );
            if let Some(rec) = rollback_record(&running).await {
                view.event(
                    t,
                    &format!(
                        "  trigger {}: {}; trip-to-swap {} µs; audit {}",
                        rec["trigger"].as_str().unwrap_or("?"),
                        rec["reason"].as_str().unwrap_or("?"),
                        rec["trip_to_swap_us"],
                        rec["id"].as_str().unwrap_or("?")
                    ),
                );
            }
        }
        view.draw(out, t, &running, &load);
    }
    load.stop().await;
    if swapped.is_none() {
        swapped_at.abort();
    }
    let rollback = rollback_record(&running).await;
    let summary = DemoSummary {
        requests: load.sent(),
        client_errors: load.failed(),
        time_to_detect: match (fault_started, swapped) {
            (Some(f), Some(s)) => Some(s.saturating_duration_since(f)),
            _ => None,
        },
        rollback,
        canary_after_rollback: if swapped.is_some() {
            canary.requests().saturating_sub(canary_at_swap)
        } else {
            0
        },
        state_dir: dir.join("state"),
    };
    running.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = write!(out, "{}", render_summary(&summary, opts.fault));
    let _ = out.flush();
    Ok(summary)
}

/// The rollback record, once written (after the candidate's in-flight requests drained).
async fn rollback_record(running: &app::Running) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let audit = running.controller.audit.clone();
        let found = tokio::task::spawn_blocking(move || audit.since(0))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|events| events.into_iter().find(|e| e["kind"] == "rollback"));
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The live per-version view: redrawn in place on a terminal, plain lines otherwise.
struct View {
    tty: bool,
    drawn_lines: usize,
    events: Vec<String>,
    printed_events: usize,
    last: Option<(Instant, u64, u64)>,
}

impl View {
    fn new(tty: bool, started: Instant) -> View {
        View {
            tty,
            drawn_lines: 0,
            events: Vec::new(),
            printed_events: 0,
            last: Some((started, 0, 0)),
        }
    }

    fn event(&mut self, t: Duration, text: &str) {
        self.events
            .push(format!("[{:>5.1}s] {text}", t.as_secs_f64()));
    }

    fn draw(&mut self, out: &mut impl Write, t: Duration, running: &app::Running, load: &Load) {
        let table = running.store.load();
        let status =
            crate::control::admin::status(&running.store, &running.controller.view(), &table);
        let now = Instant::now();
        let (s, k) = (load.ok() - load.ok_from_watched(), load.ok_from_watched());
        let rates = match self.last {
            Some((at, s0, k0)) => {
                let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                ((s - s0) as f64 / dt, (k - k0) as f64 / dt)
            }
            None => (0.0, 0.0),
        };
        self.last = Some((now, s, k));
        let weights = status
            .routes
            .first()
            .map(|r| r.weights.clone())
            .unwrap_or_default();
        let state = status
            .routes
            .first()
            .and_then(|r| serde_json::to_value(r.state).ok())
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut lines = vec![format!(
            "t={:>5.1}s  route chat: {state}, generation {}   client-visible errors: {} of {}",
            t.as_secs_f64(),
            status.generation,
            load.failed(),
            load.sent()
        )];
        lines.push(format!(
            "  {:<10} {:>6} {:>8} {:>8} {:>10}  {}",
            "version", "weight", "req/s", "errors", "ttfb p99", ""
        ));
        for v in &status.versions {
            let rate = if v.name == CANARY { rates.1 } else { rates.0 };
            lines.push(format!(
                "  {:<10} {:>6} {:>8.0} {:>7.1}% {:>8.1}ms  {}",
                v.name,
                weights.get(&v.name).copied().unwrap_or(0),
                rate,
                100.0 * v.window.error_rate,
                v.window.ttfb_p99_ms,
                if v.quarantined { "ROLLED BACK" } else { "" }
            ));
        }
        if self.tty {
            // Move up over the previous view, print new events above the redrawn view.
            if self.drawn_lines > 0 {
                let _ = write!(out, "\x1b[{}A\x1b[J", self.drawn_lines);
            }
            for e in &self.events[self.printed_events..] {
                let _ = writeln!(out, "{e}");
            }
            self.printed_events = self.events.len();
            for l in &lines {
                let _ = writeln!(out, "{l}");
            }
            self.drawn_lines = lines.len();
        } else {
            for e in &self.events[self.printed_events..] {
                let _ = writeln!(out, "{e}");
            }
            self.printed_events = self.events.len();
            let _ = writeln!(out, "{}", lines.join("\n"));
        }
        let _ = out.flush();
    }
}

fn render_summary(s: &DemoSummary, fault: Fault) -> String {
    let mut out = String::from("\nSummary\n");
    let line = |out: &mut String, k: &str, v: String| {
        out.push_str(&format!("  {k:<24}{v}\n"));
    };
    line(
        &mut out,
        "requests",
        format!(
            "{} sent, {} client-visible errors",
            s.requests, s.client_errors
        ),
    );
    line(
        &mut out,
        "fault",
        match fault {
            Fault::Error => format!("{CANARY} failed 30 % of its requests"),
            Fault::Latency => format!("{CANARY} answered after 800 ms"),
        },
    );
    match (&s.rollback, s.time_to_detect) {
        (Some(rec), Some(detect)) => {
            line(
                &mut out,
                "rolled back",
                format!(
                    "{} -> {} by {} ({})",
                    rec["from_version"].as_str().unwrap_or("?"),
                    rec["to_version"].as_str().unwrap_or("?"),
                    rec["trigger"].as_str().unwrap_or("?"),
                    rec["reason"].as_str().unwrap_or("?")
                ),
            );
            line(
                &mut out,
                "time to detect",
                format!("{} ms after the fault began", detect.as_millis()),
            );
            line(
                &mut out,
                "trip-to-swap",
                format!("{} µs", rec["trip_to_swap_us"]),
            );
            line(
                &mut out,
                "after the swap",
                format!(
                    "{CANARY} answered {} more (in flight at the swap), then nothing",
                    s.canary_after_rollback
                ),
            );
            line(
                &mut out,
                "evidence",
                format!(
                    "audit record {} in {}",
                    rec["id"].as_str().unwrap_or("?"),
                    s.state_dir.join("audit.jsonl").display()
                ),
            );
        }
        _ => line(
            &mut out,
            "rolled back",
            "no: the evaluator did not trip".into(),
        ),
    }
    out.push_str("\nNext: `rollgate mock-model`, then `rollgate run -c config/rollgate.yaml` (see README).\n");
    out
}
