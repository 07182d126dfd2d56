//! The command line as users run it: the real binary, real files.

use std::path::Path;
use std::process::Command;

fn rollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rollgate"))
}

/// `rollgate check -c PATH`.
fn check(path: &Path) -> std::process::Output {
    rollgate().args(["check", "-c"]).arg(path).output().unwrap()
}

#[test]
fn every_file_in_config_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "toml")
        ) {
            continue;
        }
        let out = check(&path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {}{}",
            path.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("is valid") && stdout.contains("rollback readiness"),
            "{stdout}"
        );
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} example configs");
}

#[test]
fn check_prints_the_effective_table_and_readiness() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rollgate.yaml");
    let out = check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("chat  match path_prefix=/v1/  baseline v2.4"),
        "{stdout}"
    );
    assert!(
        stdout.contains("v2.5             weight    5    5.0%"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[x] baseline named and last_verified"),
        "{stdout}"
    );
}

#[test]
fn invalid_config_names_file_line_column_and_key_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:8080\nversions:\n  a: {endpoints: [\"http://127.0.0.1:1\"]}\nroutes:\n  - name: r\n    match: {path_prefix: /}\n    baseline: a\n    split: {a: 1, b: 2}\n    timeouts: {connect: 5x}\n",
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(
        stderr.contains(&format!("{file}:8:12: routes[0].split.b: unknown version")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:9:25: routes[0].timeouts.connect: invalid duration"
        )),
        "{stderr}"
    );

    std::fs::write(&path, "listen: 127.0.0.1:8080\nversions:\n  a: {endpoints: [\"http://127.0.0.1:1\"]}\nroutes:\n  - name: r\n    baseline: a\n    bogus: 1\n").unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{file}:7:5: routes[0].bogus: unknown field `bogus`"
        )),
        "{stderr}"
    );
}

#[test]
fn run_refuses_an_invalid_file_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[versions.a]\nendpoints = [\"ftp://x\"]\n",
    )
    .unwrap();
    let out = rollgate().args(["run", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
}

#[test]
fn schema_is_json_schema_of_the_config() {
    let out = rollgate().arg("schema").output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["$schema"].as_str().unwrap().contains("json-schema.org"));
    let props = &v["properties"];
    for key in [
        "listen",
        "tls",
        "admin",
        "versions",
        "routes",
        "pin",
        "evaluator",
        "alerts",
        "state_dir",
        "drain_timeout",
    ] {
        assert!(props.get(key).is_some(), "schema lacks {key}");
    }
}
