//! Hostile review of 7caeb7c (`Reloader::close`, shared FINISH budget, `redact_url`) and
//! 4c494d4 (`Controller::run_tracked`, `finish` draining until empty). A slow disk is a
//! FIFO where the state's temp file goes (`state_dir/.state.json.tmp`), as in
//! tests/review_reload_shutdown.rs: a persist blocks (holding the `decisions` lock, and
//! for a reload the reloader's `turn`) until the test opens the FIFO's read end.
//!
//! On 4c494d4 four of these failed: both `shutdown_is_bounded_*` (shutdown awaited the
//! control tasks without a limit, and a watcher or health task waiting behind a stalled
//! reload or command held it as long as the stall), and both store-URL tests (a unix-socket
//! URL's `pass=` shown whole; an `@` in the query taken for the host's). The control test
//! held.

#[macro_use]
mod support;

use std::path::Path;
use std::time::Duration;

use support::instance::{shutdown_within, Stall};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// drain_timeout (2 s, nothing in flight here) + FINISH (8 s) + ACCESS_LOG_FLUSH (2 s) +
/// 3 s of slack: the most `Running::shutdown` may take by its own comments.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(15);

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// DEFECT (app.rs:315-330): the FINISH budget 7caeb7c says close() shares with the
// follow-ups bounds nothing when the reload is the watcher's. close() gives up on `turn`
// after 8 s, but the watcher task (reload.rs:494) awaits `reloader.reload()` itself and
// `shutdown` then awaits every control task with no bound (app.rs:325-327): shutdown
// lasts as long as the stalled persist, not drain + FINISH. (Pre-existing, but it is
// exactly the bound the commit claims.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_with_a_watched_reload_stalled_in_its_persist() {
    let up = TestUpstream::start("a").await;
    let url = up.http_url();
    let inst = Instance::start(|sd| instance_yaml(sd, &url, "", "")).await;
    let mut stall = Stall::new(&inst.state_tmp());
    // A real change (drain_timeout), picked up by the watcher.
    inst.edit_config_and_wait_for_the_swap(
        instance_yaml(&inst.state_dir, &url, "", "")
            .replace("drain_timeout: 2s", "drain_timeout: 3s"),
    )
    .await;
    let Instance { running, dir, .. } = inst;
    let (in_time, took) = shutdown_within(running, &mut stall, SHUTDOWN_BOUND).await;
    drop(dir);
    assert!(
        in_time,
        "Running::shutdown did not return within {SHUTDOWN_BOUND:?} (drain + FINISH + flush + \
         slack) while a watched reload was stalled in its persist; it returned only after \
         the test released the stall ({took:?}): the watcher task is awaited unbounded"
    );
}

// DEFECT (same root, app.rs:325-327, through 4c494d4's own scenario): a command whose
// persist stalls is a tracked task, and finish() bounds the wait for it. But it holds the
// `decisions` lock, and the health checker's `health_changed` (decision.rs:1299) waits for
// that lock inside the health control task, which shutdown awaits with no bound: an
// endpoint flipping while the pause is stalled makes shutdown last as long as the stall.
// The evaluator's automatic rollback (apply_at awaited in Evaluator::tick) is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_the_health_checker_waits_behind_a_stalled_command() {
    stalled_command_then_shutdown(true).await;
}

// Control for the test above: the same stalled command without the health flip. finish()
// gives up on it within FINISH and shutdown returns in time (passes): the hang above is
// the health control task's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_stalled_command_alone_is_bounded_by_finish() {
    stalled_command_then_shutdown(false).await;
}

async fn stalled_command_then_shutdown(flip: bool) {
    let up = TestUpstream::start("a").await;
    let url = up.http_url();
    let inst = Instance::start(|sd| {
        instance_yaml(
            sd,
            &url,
            "",
            ", health_check: {path: /h, interval: 20ms, timeout: 500ms, unhealthy_after: 1}",
        )
    })
    .await;
    let admin = inst.running.admin_addr;
    let mut stall = inst.stalled_pause_then_hang_up().await;
    // The endpoint fails its check: the health task flips it and calls health_changed,
    // which waits for `decisions`.
    if flip {
        up.set(Reply::Status(503));
        assert_eventually!(
            get(admin, "/readyz").await.contains("no healthy version"),
            Duration::from_secs(5),
            "the endpoint flips unhealthy"
        );
    }
    let Instance { running, dir, .. } = inst;
    let (in_time, took) = shutdown_within(running, &mut stall, SHUTDOWN_BOUND).await;
    drop(dir);
    assert!(
        in_time,
        "Running::shutdown did not return within {SHUTDOWN_BOUND:?} while a command was \
         stalled in its persist (health flip: {flip}); it returned only after the stall \
         ended ({took:?})"
    );
}

// DEFECT (config/mod.rs:151-158, validate.rs:792-800): redact_url only hides what comes
// before an '@'. The redis crate also takes a password in the query of a unix-socket URL
// (`redis+unix:///path?pass=...`, `unix://`, `valkey+unix://`); validation refuses those
// schemes, quoting the URL through redact_url whole, password included: into the error,
// hence the 422 answer, the config_reload record, the log and the audit_failed alert.
#[test]
fn a_unix_socket_store_url_is_quoted_without_its_password() {
    for url in [
        "redis+unix:///run/redis.sock?db=0&pass=hunter2-secret",
        "unix:///run/redis.sock?pass=hunter2-secret",
    ] {
        let shown = rollgate::config::redact_url(url);
        let text = format!(
            "admin: {{listen: \"127.0.0.1:0\"}}\nfleet: {{store: \"{url}\", name: f, replica: r1}}\n\
             versions:\n  a: {{endpoints: [\"http://127.0.0.1:1\"]}}\n\
             routes:\n  - {{name: chat, match: {{path_prefix: /}}, baseline: a, split: {{a: 100}}}}\n"
        );
        let err = rollgate::config::Config::from_str(&text, Path::new("r.yaml"))
            .expect_err("a unix-socket store URL is refused")
            .to_string();
        assert!(
            !shown.contains("hunter2-secret") && !err.contains("hunter2-secret"),
            "redact_url({url:?}) = {shown:?}; the validation error: {err}"
        );
    }
}

// Holds or not: '@' after the host (query, fragment) makes redact_url hide the host and
// keep the tail: the operator is told the wrong host. Not a leak; recorded as minor.
#[test]
fn redact_url_keeps_the_host_when_the_query_has_an_at_sign() {
    let shown = rollgate::config::redact_url("redis://cache.internal:6379/0?client=a@b");
    assert!(
        shown.contains("cache.internal"),
        "redact_url hid the host: {shown:?}"
    );
}
