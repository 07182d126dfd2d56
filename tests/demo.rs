//! `rollgate demo` end to end: the real binary, its summary checked against its audit log.

use std::process::Command;

fn summary_value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key:?} line in:\n{out}"))
}

fn run_demo(fault: &str) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_rollgate"))
        .args(["demo", "--fault", fault, "--duration", "8s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: plain lines, no cursor movement.
    assert!(!stdout.contains('\x1b'), "{stdout}");
    assert!(stdout.contains("v1-stable") && stdout.contains("v2-canary"));
    let evidence = summary_value(&stdout, "evidence");
    let path = evidence.split(" in ").nth(1).unwrap();
    let id = evidence
        .strip_prefix("audit record ")
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let records: Vec<serde_json::Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rollbacks: Vec<_> = records.iter().filter(|r| r["kind"] == "rollback").collect();
    assert_eq!(rollbacks.len(), 1, "{records:?}");
    let rec = rollbacks[0].clone();
    assert_eq!(rec["id"], id);
    let _ = std::fs::remove_dir_all(
        std::path::Path::new(path)
            .parent()
            .unwrap()
            .parent()
            .unwrap(),
    );
    (stdout, rec)
}

#[test]
fn demo_error_fault_rolls_back_with_zero_client_errors_as_its_audit_log_says() {
    let (out, rec) = run_demo("error");
    let requests = summary_value(&out, "requests");
    assert!(
        requests.ends_with("sent, 0 client-visible errors"),
        "{requests}"
    );
    let sent: u64 = requests.split(' ').next().unwrap().parse().unwrap();
    assert!(sent > 500, "{sent}");
    assert_eq!(rec["from_version"], "v2-canary");
    assert_eq!(rec["to_version"], "v1-stable");
    assert_eq!(rec["automatic"], true);
    let trigger = rec["trigger"].as_str().unwrap();
    assert!(
        trigger == "error_rate_ratio" || trigger == "error_rate_max",
        "{trigger}"
    );
    let rolled = summary_value(&out, "rolled back");
    assert!(
        rolled.starts_with(&format!("v2-canary -> v1-stable by {trigger}")),
        "{rolled}"
    );
    assert_eq!(
        summary_value(&out, "trip-to-swap"),
        format!("{} µs", rec["trip_to_swap_us"])
    );
    let detect: u64 = summary_value(&out, "time to detect")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(detect < 5_000, "{detect} ms");
}

#[test]
fn demo_latency_fault_rolls_back_on_a_latency_rule() {
    let (out, rec) = run_demo("latency");
    assert!(
        summary_value(&out, "requests").ends_with("0 client-visible errors"),
        "{out}"
    );
    let trigger = rec["trigger"].as_str().unwrap();
    assert!(trigger.starts_with("latency_p99"), "{trigger}");
}
