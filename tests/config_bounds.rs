//! Config bounds and `check` warnings as users meet them: the real binary, real files.
//!
//! Every number in the file is bounded so that a value that passed `rollgate check` can
//! neither panic the proxy later nor make a rule fire on every tick; a value out of range
//! fails `check` with exit 1 and a message naming file, line, column and key. A valid file
//! whose rules cannot work as configured passes with a `warnings:` section.

use std::path::Path;
use std::process::{Command, Output};

fn rollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rollgate"))
}

/// `rollgate check -c PATH`.
fn check(path: &Path) -> Output {
    rollgate().args(["check", "-c"]).arg(path).output().unwrap()
}

/// Two versions, one route; `extra` goes at the end, from line 8 on.
const BASE: &str = "listen: 127.0.0.1:8080\nversions:\n  a: {endpoints: [\"http://127.0.0.1:1\"]}\n  b: {endpoints: [\"http://127.0.0.1:2\"]}\nroutes:\n  - {name: chat, baseline: a, split: {a: 90, b: 10}}\n";

/// Writes `BASE` + `extra` to a temp file and runs `check` on it.
fn check_text(extra: &str) -> (Output, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollgate.yaml");
    std::fs::write(&path, format!("{BASE}{extra}")).unwrap();
    let out = check(&path);
    (out, path.display().to_string(), dir)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn health_failures_zero_is_refused_at_its_line_and_key() {
    // 0 would roll back every candidate on the first tick.
    let (out, file, _dir) = check_text("evaluator:\n  rules:\n    health_failures: 0\n");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{file}:9:22: evaluator.rules.health_failures: 0 is out of range: must be an integer from 1 to 1000"
        )),
        "{err}"
    );
}

#[test]
fn a_huge_latency_ratio_is_refused() {
    // 1e20 used to pass and then panic in Duration::mul_f64 on the evaluator's first tick.
    let (out, file, _dir) = check_text("evaluator: {rules: {latency_p99_ratio: 1e20}}\n");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{file}:7:"))
            && err.contains("evaluator.rules.latency_p99_ratio: 1e20 is out of range"),
        "{err}"
    );
    for bad in [".inf", ".nan", "1.0", "1000.5"] {
        let (out, _, _dir) = check_text(&format!(
            "evaluator: {{rules: {{latency_p99_ratio: {bad}}}}}\n"
        ));
        assert_eq!(out.status.code(), Some(1), "{bad}: {}", stdout(&out));
    }
}

#[test]
fn min_error_rate_is_accepted_and_bounded() {
    for ok in ["0.005", "0", "0.2", "null"] {
        let (out, _, _dir) =
            check_text(&format!("evaluator: {{rules: {{min_error_rate: {ok}}}}}\n"));
        assert!(out.status.success(), "{ok}: {}", stderr(&out));
        assert!(stdout(&out).contains("is valid"), "{}", stdout(&out));
    }
    let (out, file, _dir) = check_text("evaluator: {rules: {min_error_rate: 1.5}}\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{file}:7:"))
            && stderr(&out).contains("evaluator.rules.min_error_rate"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn admin_hosts_must_be_host_names() {
    let (out, _, _dir) = check_text("admin:\n  hosts: [rollgate-admin.ml, Gateway.Internal]\n");
    assert!(out.status.success(), "{}", stderr(&out));

    let (out, file, _dir) =
        check_text("admin:\n  hosts: [rollgate-admin.ml, \"rollgate-admin.ml:9901\"]\n");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{file}:8:30: admin.hosts[1]:")) && err.contains("port"),
        "{err}"
    );
    let (out, file, _dir) = check_text("admin: {hosts: [\"evil host\"]}\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("{file}:7:")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let (out, file, _dir) = check_text(
        "drain_timeout: 2h\nmax_in_flight: 0\nevaluator:\n  interval: 1ms\n  confidence: 1.0\n  rules: {error_rate_ratio: 1e9, safety_violations: {header: x-f, max: 1, per: 0s}}\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    for (line, key) in [
        (7, "drain_timeout"),
        (8, "max_in_flight"),
        (10, "evaluator.interval"),
        (11, "evaluator.confidence"),
        (12, "evaluator.rules.error_rate_ratio"),
        (12, "evaluator.rules.safety_violations.per"),
    ] {
        assert!(
            err.contains(&format!("{file}:{line}:")) && err.contains(&format!(": {key}: ")),
            "{key}: {err}"
        );
    }
    assert_eq!(err.lines().count(), 6, "{err}");
}

#[test]
fn latency_sla_on_v1_routes_is_a_warning_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rollgate.yaml");
    std::fs::write(
        &path,
        BASE.replace(
            "{name: chat, baseline: a,",
            "{name: chat, match: {path_prefix: /v1/}, baseline: a,",
        ) + "evaluator: {rules: {latency_p99_max: 800ms}}\n",
    )
    .unwrap();
    let out = check(&path);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let warnings = text
        .split_once("\nwarnings:\n")
        .unwrap_or_else(|| panic!("no warnings section:\n{text}"))
        .1;
    assert!(
        warnings.contains(
            "  - route chat: evaluator.rules.latency_p99_max is 800ms but the route matches OpenAI completion paths (path_prefix /v1/)"
        ),
        "{warnings}"
    );
    assert!(warnings.contains("accuracy_drop"), "{warnings}");
    assert!(warnings.contains("health_failures"), "{warnings}");

    // The same file with those rules off has nothing to warn about.
    std::fs::write(
        &path,
        BASE.replace(
            "{name: chat, baseline: a,",
            "{name: chat, match: {path_prefix: /v1/}, baseline: a,",
        ) + "evaluator: {rules: {latency_p99_max: null, accuracy_drop: null, health_failures: null}}\n",
    )
    .unwrap();
    let out = check(&path);
    assert!(out.status.success());
    assert!(!stdout(&out).contains("warnings:"), "{}", stdout(&out));
}

#[test]
fn schema_documents_the_new_keys_and_their_bounds() {
    let out = rollgate().arg("schema").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["$defs"]["FileAdmin"]["properties"]["hosts"].is_object(),
        "{text}"
    );
    let rules = &v["$defs"]["FileRules"]["properties"];
    assert!(rules["min_error_rate"].is_object(), "{text}");
    let desc = rules["health_failures"]["description"].as_str().unwrap();
    assert!(desc.contains("1 to 1000"), "{desc}");
    let drift = &v["$defs"]["FileDrift"]["properties"];
    assert!(drift["p_value"]["description"]
        .as_str()
        .unwrap()
        .contains("Deprecated"));
}
