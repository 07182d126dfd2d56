//! Review of issue 17's changes (e31db4b..HEAD): reloads taking turns, the shadow copy's
//! access-log line cloned from the client's, `choose_route` moving the body.

#[macro_use]
mod support;

use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use support::*;

/// The access log is process-wide: tests that turn it on take turns.
static PROCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn config_path(proxy: &TestProxy) -> PathBuf {
    let r = TestClient::http1()
        .get(&proxy.admin_url("/api/v1/config"))
        .await;
    PathBuf::from(r.json()["source"].as_str().unwrap())
}

async fn owner(proxy: &TestProxy) -> String {
    let s = proxy.status_json().await;
    s["routes"][0]["owner"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A read of the config file that never returns (a hung NFS/FUSE volume; here a FIFO that
/// the file watcher's reload opened and that nobody writes) holds the reload turn. Before
/// the turn, `POST /api/v1/reload` read the file itself and applied the operator's fixed
/// file; now it queues behind the stuck reload forever (no timeout anywhere), and so does
/// every later reload: config changes stop applying until a restart.
#[tokio::test]
async fn an_api_reload_is_not_held_up_by_a_watched_reload_stuck_reading_the_file() {
    let stable = TestUpstream::start("stable").await;
    let proxy = TestProxy::new()
        .version("stable", &stable)
        .route(Route::new("chat", "stable"))
        .start()
        .await;
    let path = config_path(&proxy).await;
    let good = proxy.yaml().to_string();
    assert_eq!(owner(&proxy).await, "rollgate-tests");

    // A FIFO, kept reachable under a second name, moved over the config file.
    let side = tempfile::tempdir_in(path.parent().unwrap().parent().unwrap()).unwrap();
    let fifo = side.path().join("config.fifo");
    let keep = side.path().join("keep.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    std::fs::hard_link(&fifo, &keep).unwrap();
    // Opening the write end returns once a reader (the watcher's reload) has opened it;
    // holding it open without writing keeps that reader's read blocked.
    let (tx, rx) = std::sync::mpsc::channel();
    let opener = {
        let keep = keep.clone();
        std::thread::spawn(move || {
            let w = std::fs::OpenOptions::new().write(true).open(&keep).unwrap();
            tx.send(()).unwrap();
            w
        })
    };
    std::fs::rename(&fifo, &path).unwrap();
    let opened = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(opened.is_ok(), "the watcher never read the new config file");
    let writer = opener.join().unwrap();

    // The operator puts a good file back and asks for a reload.
    save_like_an_editor(&path, &good.replace("rollgate-tests", "fixed"));
    let asked = TestClient::http1()
        .try_send(
            request(Method::POST, &proxy.admin_url("/api/v1/reload"))
                .header("content-type", "application/json")
                .body(full("{}"))
                .unwrap(),
        )
        .await;
    // Unblock the stuck read (it sees an empty file, which is rejected) before judging.
    drop(writer);
    let status = asked.as_ref().map(|r| r.status.as_u16());
    let applied = owner(&proxy).await;
    proxy.shutdown().await;
    assert_eq!(
        status,
        Ok(200),
        "POST /api/v1/reload waited on a watched reload stuck reading the file"
    );
    assert_eq!(applied, "fixed");
}

/// The shadow copy's access-log line is now a clone of the client's line: it must still
/// name the shadow version, its own upstream and reason `shadow`, and keep the request's
/// id, route, method, path and body size; the client's line keeps its own.
#[tokio::test]
async fn the_shadow_copy_logs_its_own_line_next_to_the_clients() {
    let _g = PROCESS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let stable = TestUpstream::start("stable").await;
    let shadow = TestUpstream::start("shadow").await;
    shadow.set(Reply::Status(503));
    let proxy = TestProxy::new()
        .top(&format!("access_log: {{path: \"{}\"}}", log.display()))
        .version("stable", &stable)
        .version("shadow", &shadow)
        .route(Route::new("chat", "stable").with("shadow: {version: shadow, percent: 100}"))
        .start()
        .await;
    let body = "{\"model\":\"m\",\"prompt\":\"hello\"}";
    let r = TestClient::http1()
        .send(
            request(Method::POST, &proxy.url("/v1/completions"))
                .header("content-type", "application/json")
                .header("x-request-id", "rev17-shadow")
                .body(full(body))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["request_id"] == "rev17-shadow")
            .collect()
    };
    assert_eventually!(lines().len() >= 2, Duration::from_secs(10), "{:?}", lines());
    let all = lines();
    rollgate::telemetry::access_log::install(None);
    proxy.shutdown().await;
    assert_eq!(all.len(), 2, "{all:#?}");
    let client = all
        .iter()
        .find(|l| l["version"] == "stable")
        .expect("client line");
    let copy = all
        .iter()
        .find(|l| l["version"] == "shadow")
        .expect("shadow line");
    assert_eq!(client["reason"], "weight", "{client}");
    assert_eq!(client["code"], 200, "{client}");
    assert_eq!(
        client["upstream_host"],
        stable.addr().to_string(),
        "{client}"
    );
    assert_eq!(copy["reason"], "shadow", "{copy}");
    assert_eq!(copy["code"], 503, "{copy}");
    assert_eq!(copy["classification"], "error", "{copy}");
    assert_eq!(copy["upstream_host"], shadow.addr().to_string(), "{copy}");
    for k in ["route", "method", "path", "protocol", "authority"] {
        assert_eq!(copy[k], client[k], "{k}: {copy} vs {client}");
    }
    assert_eq!(copy["bytes_received"], body.len(), "{copy}");
}

/// `choose_route` now moves the body instead of swapping in a placeholder. At e31db4b a
/// model route whose model came from `x-gateway-model-name` lost the request body (the
/// placeholder was forwarded as an empty body); HEAD forwards it. Nothing pinned it.
#[tokio::test]
async fn a_model_named_in_the_header_keeps_its_request_body() {
    let llama = TestUpstream::start("llama").await;
    let proxy = TestProxy::new()
        .version("llama", &llama)
        .route(Route::new("llama", "llama").matching("{path_prefix: /v1/, model: [llama-3]}"))
        .start()
        .await;
    let body = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    let r = TestClient::http1()
        .post_json(
            &proxy.url("/v1/chat/completions"),
            body,
            &[("x-gateway-model-name", "llama-3"), ("x-test-id", "hdr")],
        )
        .await;
    assert_eq!(r.version(), Some("llama"));
    let seen = llama.requests_with_id("hdr");
    proxy.shutdown().await;
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], body.as_bytes());
}
