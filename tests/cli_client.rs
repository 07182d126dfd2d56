//! The admin client as operators run it: the real binary against a live proxy.

#[macro_use]
mod support;

use support::*;

/// Runs `rollgate ARGS` with `ROLLGATE_TOKEN` unset unless given; (exit code, stdout, stderr).
async fn rollgate(args: &[&str], token_env: Option<&str>) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rollgate"));
    cmd.args(args)
        .env_remove("ROLLGATE_TOKEN")
        .env_remove("ROLLGATE_ADMIN");
    if let Some(t) = token_env {
        cmd.env("ROLLGATE_TOKEN", t);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
        .await
        .expect("the CLI finishes")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn stable_and_canary(token: Option<&str>) -> (TestUpstream, TestUpstream, TestProxy) {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let mut b = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 90), ("canary", 10)]));
    if let Some(t) = token {
        b = b.admin_token(t);
    }
    (stable, canary, b.start().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table_and_json_that_parses() {
    let (_s, _c, proxy) = stable_and_canary(None).await;
    let client = TestClient::http1();
    for _ in 0..20 {
        assert_eq!(client.get(&proxy.url("/")).await.status, 200);
    }
    let admin = format!("http://{}", proxy.admin_addr());
    let (code, out, err) = rollgate(&["status", "--admin", &admin], None).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ROUTE") && out.contains("VERSION"), "{out}");
    let chat = out.lines().find(|l| l.starts_with("chat ")).unwrap();
    assert!(
        chat.contains("canary=10 stable=90") && chat.contains("steady"),
        "{chat}"
    );

    let (code, out, err) = rollgate(&["status", "--admin", &admin, "--json"], None).await;
    assert_eq!(code, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["routes"][0]["weights"]["canary"], 10);
    let requests: u64 = s["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["window"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 20);
    // The Prometheus histograms agree with the counts (Flagger's histogram_quantile needs it).
    for h in [
        "rollgate_request_duration_seconds",
        "rollgate_time_to_first_byte_seconds",
    ] {
        let inf = proxy
            .metric(&format!("{h}_bucket"), &[("le", "+Inf")])
            .await;
        let count = proxy.metric(&format!("{h}_count"), &[]).await;
        let top = proxy
            .metric(&format!("{h}_bucket"), &[("le", "600.0")])
            .await;
        assert_eq!(
            (inf, count, top),
            (20.0, 20.0, 20.0),
            "{h}:\n{}",
            proxy
                .metrics_text()
                .await
                .lines()
                .filter(|l| l.starts_with(h))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_resume_weights_and_events_through_the_cli() {
    let (_s, _c, proxy) = stable_and_canary(Some("s3cret")).await;
    let admin = format!("http://{}", proxy.admin_addr());
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "s3cret\n").unwrap();
    let tf = token_file.path().to_str().unwrap();

    // Without a token: a plain error, exit 1, nothing changed.
    let (code, out, err) = rollgate(
        &["rollback", "--version", "canary", "--admin", &admin],
        None,
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("refused the token (401)"), "{err}");
    let (code, _, err) = rollgate(
        &["rollback", "--version", "canary", "--admin", &admin],
        Some("wrong"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    assert_eq!(proxy.status_json().await["generation"], 1);

    let (code, out, err) = rollgate(
        &[
            "rollback",
            "--version",
            "canary",
            "--reason",
            "bad prompt",
            "--operator",
            "alice",
            "--admin",
            &admin,
            "--token-file",
            tf,
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rollback") && out.contains("trigger=manual") && out.contains("by=alice"),
        "{out}"
    );
    let s = proxy.status_json().await;
    assert_eq!(s["routes"][0]["weights"]["canary"], 0);

    let (code, out, err) = rollgate(
        &["resume", "--version", "canary", "--admin", &admin, "--json"],
        Some("s3cret"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let rec: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["kind"], "resume");

    let (code, _, err) = rollgate(
        &[
            "weights",
            "--route",
            "chat",
            "stable=50",
            "canary=50",
            "--admin",
            &admin,
        ],
        Some("s3cret"),
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        proxy.status_json().await["routes"][0]["weights"]["canary"],
        50
    );

    // An API error is one plain line: unknown version.
    let (code, _, err) = rollgate(
        &["rollback", "--version", "nope", "--admin", &admin],
        Some("s3cret"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("nope"), "{err}");

    let (code, out, err) = rollgate(&["events", "--admin", &admin, "--json"], None).await;
    assert_eq!(code, 0, "{err}");
    let ev: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    // The rollback's drain and alert results follow it in a record of their own.
    assert_eq!(
        kinds,
        ["rollback", "rollback_completed", "resume", "weights"]
    );
    let first = ev["events"][1]["id"].as_str().unwrap().to_string();
    let (code, out, _) = rollgate(&["events", "--since", &first, "--admin", &admin], None).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.lines().next().unwrap().contains("resume"), "{out}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_proxy_is_one_plain_error() {
    let admin = format!("http://127.0.0.1:{}", closed_port());
    let (code, out, err) = rollgate(&["status", "--admin", &admin], None).await;
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(
        err.starts_with("rollgate: cannot reach the admin API at") && err.lines().count() == 1,
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_trips_restores_scores_and_records_what_the_audit_log_says() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let hook = TestUpstream::start("hook").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .version("canary", &canary)
        .route(Route::new("chat", "stable").split(&[("stable", 70), ("canary", 30)]))
        .top("evaluator: {interval: 100ms, window: 30s, min_requests: 50}")
        .top(&format!(
            "alerts: {{webhooks: [{{url: \"{}/hook\"}}]}}",
            hook.http_url()
        ))
        .start()
        .await;
    let admin = format!("http://{}", proxy.admin_addr());
    let load = proxy.url("/v1/chat/completions");
    let drill = [
        "drill",
        "--version",
        "canary",
        "--fault",
        "error=0.5",
        "--timeout",
        "20s",
        "--load",
        &load,
        "--admin",
        &admin,
        "--json",
    ];
    let (code, out, err) = rollgate(&drill, None).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let rec: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["kind"], "drill");
    assert_eq!(rec["passed"], true);
    assert_eq!(rec["score"], 100, "{rec:#}");
    assert_eq!(rec["client_errors"], 0);
    assert!(rec["requests"].as_u64().unwrap() > 50);
    // The drill's claims match the audit log.
    let (_, events, _) = rollgate(&["events", "--admin", &admin, "--json"], None).await;
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let events = events["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    // The injected fault and its clearing are recorded too.
    assert_eq!(
        kinds,
        [
            "fault",
            "rollback",
            "rollback_completed",
            "fault",
            "resume",
            "drill"
        ]
    );
    assert_eq!(rec["rollback_id"], events[1]["id"]);
    assert_eq!(events[2]["rollback_id"], events[1]["id"]);
    // A drill's rollback counts as a drill, never as an incident, and names the rule.
    assert_eq!(events[1]["trigger"], "drill");
    assert_eq!(rec["trigger"], events[1]["trigger"]);
    assert_eq!(rec["rule"], events[1]["rule"]);
    assert_eq!(rec["trip_to_swap_us"], events[1]["trip_to_swap_us"]);
    assert_eq!(hook.request_count(), 1);
    // Restored, and the drill is visible to monitoring.
    let s = proxy.status_json().await;
    assert_eq!(s["routes"][0]["weights"]["canary"], 30);
    // A second drill right after the first: the resumed canary is judged on new traffic
    // only, so the first drill's injected errors cannot roll it back again.
    let (code, out, err) = rollgate(&drill, None).await;
    assert_eq!(code, 0, "second drill: {out}\n{err}");
    let (_, events, _) = rollgate(&["events", "--admin", &admin, "--json"], None).await;
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "fault",
            "rollback",
            "rollback_completed",
            "fault",
            "resume",
            "drill",
            "fault",
            "rollback",
            "rollback_completed",
            "fault",
            "resume",
            "drill"
        ]
    );
    let drilled_at = proxy
        .metric("rollgate_rollback_drill_timestamp_seconds", &[])
        .await;
    assert!(drilled_at > 1.7e9);
    // A restart on the same state_dir still knows when the last drill passed (from the
    // audit log), so a "no drill in 30 days" alert does not fire after every restart.
    let config =
        rollgate::config::Config::from_str(proxy.yaml(), std::path::Path::new("restarted.yaml"))
            .unwrap();
    let listeners = rollgate::app::Listeners {
        data: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        health: None,
    };
    let restarted = rollgate::app::start(config, listeners).await.unwrap();
    let text = TestClient::http1()
        .get(&format!("http://{}/metrics", restarted.admin_addr))
        .await
        .text();
    let after_restart = metric_sum(&text, "rollgate_rollback_drill_timestamp_seconds", &[]);
    assert!(
        (after_restart - drilled_at).abs() < 1.0,
        "drill at {drilled_at}, after a restart {after_restart}"
    );
    restarted.shutdown().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_that_never_trips_fails_with_exit_1_and_is_recorded_as_failed() {
    let (_s, _c, proxy) = stable_and_canary(None).await;
    let admin = format!("http://{}", proxy.admin_addr());
    // No traffic: the evaluator has nothing to judge, so nothing trips.
    let (code, out, err) = rollgate(
        &[
            "drill",
            "--version",
            "canary",
            "--timeout",
            "1s",
            "--admin",
            &admin,
        ],
        None,
    )
    .await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("FAILED") && out.contains("no rollback within the timeout"),
        "{out}"
    );
    assert_eq!(
        proxy
            .metric("rollgate_rollback_drill_timestamp_seconds", &[])
            .await,
        0.0
    );
    // Unknown version: a plain error.
    let (code, _, err) = rollgate(&["drill", "--version", "nope", "--admin", &admin], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("no version nope"), "{err}");
    proxy.shutdown().await;
}
