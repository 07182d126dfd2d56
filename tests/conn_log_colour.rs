//! Log colour (`init_tracing` in `src/main.rs`): ANSI escapes only when stderr is a terminal
//! and `NO_COLOR` is unset (or empty, as no-color.org has it). Logs written to a file, a pipe
//! or a collector are plain text. The terminal cases run `rollgate` under `script(1)`, which
//! gives it a pseudo-terminal; they are skipped with a message where `script` is missing.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rollgate");
/// Upper bound for rollgate to start (and, under `script`, to stop).
const LIMIT: Duration = Duration::from_secs(20);

/// A one-route config listening on port 0 (the upstream is never called).
fn config(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let path = dir.join("rollgate.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\n\
             admin: {{listen: 127.0.0.1:0}}\n\
             state_dir: \"{}\"\n\
             drain_timeout: 1s\n\
             evaluator: {{min_requests: 1000000}}\n\
             versions:\n  \
               v1: {{endpoints: [\"http://127.0.0.1:9\"]}}\n\
             routes:\n  \
               - {{name: chat, owner: rollgate-tests, match: {{path_prefix: /}}, baseline: v1, split: {{v1: 100}}}}\n",
            state.display()
        ),
    )
    .unwrap();
    path
}

fn has_ansi(text: &str) -> bool {
    text.contains('\x1b')
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut child = Command::new(BIN)
        .args(["--log-format", "text", "run", "-c"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rollgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + LIMIT;
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("rollgate serving"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = lines.join("\n");
    assert!(
        text.contains("rollgate serving"),
        "rollgate did not start within {LIMIT:?}:\n{text}"
    );
    assert!(
        !has_ansi(&text),
        "colour codes in a log written to a pipe:\n{text:?}"
    );
}

/// Runs rollgate for 2 s on a pseudo-terminal (`script`), `NO_COLOR` set to `no_color` (or
/// unset): what it wrote, or `None` without `script`.
fn on_a_terminal(no_color: Option<&str>) -> Option<String> {
    let found = Command::new("script")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skip: script(1) not installed, the terminal case is not checked");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // `timeout` sends SIGTERM, on which rollgate drains and exits, and `script` with it.
    let inner = format!(
        "timeout -s TERM 2 '{BIN}' --log-format text run -c '{}'",
        cfg.display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-f", "-e", "-c", &inner, "/dev/null"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match no_color {
        Some(v) => cmd.env("NO_COLOR", v),
        None => cmd.env_remove("NO_COLOR"),
    };
    let mut child = cmd.spawn().expect("spawn script");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let out = rx.recv_timeout(LIMIT);
    let _ = child.kill();
    let _ = child.wait();
    let out = out.unwrap_or_else(|_| panic!("rollgate under script still running after {LIMIT:?}"));
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn logs_to_a_terminal_are_coloured_unless_no_color_is_set() {
    let Some(plain_tty) = on_a_terminal(None) else {
        return;
    };
    assert!(
        plain_tty.contains("rollgate serving"),
        "no log under script:\n{plain_tty}"
    );
    assert!(
        has_ansi(&plain_tty),
        "no colour on a terminal:\n{plain_tty:?}"
    );
    for no_color in ["1", "true"] {
        let Some(text) = on_a_terminal(Some(no_color)) else {
            return;
        };
        assert!(
            text.contains("rollgate serving"),
            "no log under script:\n{text}"
        );
        assert!(
            !has_ansi(&text),
            "colour on a terminal with NO_COLOR={no_color}:\n{text:?}"
        );
    }
    let Some(text) = on_a_terminal(Some("")) else {
        return;
    };
    assert!(
        has_ansi(&text),
        "an empty NO_COLOR turned colour off (no-color.org: only a non-empty value does):\n{text:?}"
    );
}
