//! `rollgate mock-model` as the demo, the tests and users drive it: a real server on
//! 127.0.0.1:0, real HTTP/1.1 and h2c clients, knobs turned while it serves, and the binary
//! itself started, queried and stopped with SIGTERM.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use rollgate::mock::{serve, MockModel, MockOptions};
use serde_json::Value;
use support::{empty, request, TestClient, TestResponse, REQUEST_TIMEOUT};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A mock model served on an ephemeral port until [`Mock::stop`] (or drop).
struct Mock {
    model: MockModel,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Mock {
    async fn start(options: MockOptions) -> Mock {
        let model = MockModel::new(options).expect("valid options");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, model.clone(), async move {
            let _ = stopped.await;
        }));
        Mock {
            model,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn chat(&self, body: &str) -> TestResponse {
        TestClient::http1()
            .post_json(&self.url("/v1/chat/completions"), body.to_owned(), &[])
            .await
    }

    /// Signals shutdown and waits (bounded) for `serve` to return.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(REQUEST_TIMEOUT, task)
            .await
            .expect("serve returns after shutdown")
            .expect("serve does not panic");
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

const HELLO: &str =
    r#"{"model":"whatever","messages":[{"role":"user","content":"say hello to me"}]}"#;

fn score_of(resp: &TestResponse) -> f64 {
    let raw = resp.header("x-model-score").expect("x-model-score header");
    raw.parse::<f64>()
        .unwrap_or_else(|e| panic!("x-model-score {raw:?} is not a number: {e}"))
}

/// The `data:` payloads of an SSE body, in order.
fn sse_events(body: &str) -> Vec<&str> {
    assert!(
        body.ends_with("\n\n"),
        "SSE body ends with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: `: {e:?}"))
        })
        .collect()
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape_and_names_the_version() {
    let mock = Mock::start(MockOptions {
        chunks: 4,
        score_mean: 0.8,
        score_jitter: 0.05,
        ..MockOptions::named("v2.5")
    })
    .await;
    let resp = mock.chat(HELLO).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-mock-version"), Some("v2.5"));
    let score = score_of(&resp);
    assert!((0.75..=0.85).contains(&score), "score {score}");

    let body = resp.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    // The served name, not the requested one: it says who answered.
    assert_eq!(body["model"], "v2.5");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 4, "{content:?}");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(body["usage"]["total_tokens"], 8);
    assert_eq!(body["score"].as_f64(), Some(score), "body and header agree");

    assert_eq!(mock.model.requests(), 1);
    assert_eq!(mock.model.faults(), 0);
    mock.stop().await;
}

#[tokio::test]
async fn text_completion_has_the_openai_shape() {
    let mock = Mock::start(MockOptions::named("v1")).await;
    let resp = TestClient::http1()
        .post_json(
            &mock.url("/v1/completions"),
            r#"{"model":"v1","prompt":"once upon a time"}"#,
            &[],
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "v1");
    assert!(!body["choices"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 4);
    assert!(body["score"].is_f64());
    mock.stop().await;
}

#[tokio::test]
async fn streaming_chat_sends_paced_chunks_then_done() {
    let interval = Duration::from_millis(20);
    let mock = Mock::start(MockOptions {
        chunks: 5,
        chunk_interval: interval,
        ..MockOptions::named("canary")
    })
    .await;
    let whole = mock.chat(HELLO).await.json();

    let started = tokio::time::Instant::now();
    let resp = mock
        .chat(r#"{"messages":[{"role":"user","content":"say hello to me"}],"stream":true}"#)
        .await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.header("x-mock-version"), Some("canary"));
    let score = score_of(&resp);

    let text = resp.text();
    let events = sse_events(&text);
    assert_eq!(events.len(), 6, "5 chunks and [DONE]: {text}");
    assert_eq!(events[5], "[DONE]");
    let chunks: Vec<Value> = events[..5]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut content = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "canary");
        assert_eq!(chunk["id"], chunks[0]["id"], "one id per stream");
        assert_eq!(chunk["score"].as_f64(), Some(score));
        let finish = &chunk["choices"][0]["finish_reason"];
        if i == 4 {
            assert_eq!(finish, "stop");
        } else {
            assert!(finish.is_null(), "chunk {i}: {chunk}");
        }
        content.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        content, whole["choices"][0]["message"]["content"],
        "a stream says what the whole answer says"
    );
    // Four gaps of `interval` between five chunks: a lower bound, so not timing-flaky.
    assert!(elapsed >= interval * 4, "stream took only {elapsed:?}");
    mock.stop().await;
}

#[tokio::test]
async fn stream_flag_and_default() {
    let mock = Mock::start(MockOptions {
        stream_default: true,
        chunks: 3,
        chunk_interval: Duration::ZERO,
        ..MockOptions::named("s")
    })
    .await;
    let client = TestClient::http1();
    let url = mock.url("/v1/completions");

    // No `stream` field: the default (here, streaming).
    let resp = client.post_json(&url, r#"{"prompt":"x"}"#, &[]).await;
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let text = resp.text();
    let events = sse_events(&text);
    assert_eq!(events.len(), 4, "{text}");
    let first: Value = serde_json::from_str(events[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert!(first["choices"][0]["text"].is_string());

    // `"stream": false` wins over the default.
    let resp = client
        .post_json(&url, r#"{"prompt":"x","stream":false}"#, &[])
        .await;
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.json()["object"], "text_completion");

    // Not a boolean: a client error.
    let resp = client
        .post_json(&url, r#"{"prompt":"x","stream":"yes"}"#, &[])
        .await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"]["type"], "invalid_request_error");

    // Zero chunks: just the end marker.
    let zero = Mock::start(MockOptions {
        chunks: 0,
        ..MockOptions::named("z")
    })
    .await;
    let resp = zero.chat(r#"{"messages":[],"stream":true}"#).await;
    assert_eq!(resp.text(), "data: [DONE]\n\n");
    zero.stop().await;
    mock.stop().await;
}

#[tokio::test]
async fn models_lists_the_served_name() {
    let mock = Mock::start(MockOptions::named("v2.4")).await;
    let resp = TestClient::http1().get(&mock.url("/v1/models")).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-mock-version"), Some("v2.4"));
    score_of(&resp);
    let body = resp.json();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["v2.4"]);
    assert_eq!(mock.model.requests(), 0, "listing is not inference traffic");
    mock.stop().await;
}

#[tokio::test]
async fn health_follows_the_knob() {
    let mock = Mock::start(MockOptions::named("h")).await;
    let client = TestClient::http1();
    for path in ["/health/ready", "/health"] {
        let resp = client.get(&mock.url(path)).await;
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.header("x-mock-version"), Some("h"));
    }
    mock.model.set_healthy(false);
    assert!(!mock.model.healthy());
    for path in ["/health/ready", "/health"] {
        assert_eq!(client.get(&mock.url(path)).await.status, 503, "{path}");
    }
    // Unhealthy is about health checks only; completions still answer.
    assert_eq!(mock.chat(HELLO).await.status, 200);
    mock.model.set_healthy(true);
    assert_eq!(client.get(&mock.url("/health/ready")).await.status, 200);
    mock.stop().await;
}

#[tokio::test]
async fn error_rate_one_always_fails_and_zero_never_does() {
    let failing = Mock::start(MockOptions {
        error_rate: 1.0,
        ..MockOptions::named("bad")
    })
    .await;
    let fine = Mock::start(MockOptions::named("good")).await;
    for _ in 0..20 {
        let resp = failing.chat(HELLO).await;
        assert_eq!(resp.status, 500);
        assert_eq!(resp.header("x-mock-version"), Some("bad"));
        score_of(&resp);
        let body = resp.json();
        assert_eq!(body["error"]["type"], "server_error");
        assert!(body["error"]["message"].as_str().unwrap().contains("fault"));
    }
    assert_eq!(failing.model.requests(), 20);
    assert_eq!(failing.model.faults(), 20);
    // Faults are for completions; health and listing stay truthful.
    let client = TestClient::http1();
    assert_eq!(client.get(&failing.url("/health/ready")).await.status, 200);
    assert_eq!(client.get(&failing.url("/v1/models")).await.status, 200);

    for _ in 0..100 {
        assert_eq!(fine.chat(HELLO).await.status, 200);
    }
    assert_eq!(fine.model.faults(), 0);
    failing.stop().await;
    fine.stop().await;
}

#[tokio::test]
async fn set_error_rate_applies_while_serving() {
    let mock = Mock::start(MockOptions::named("knob")).await;
    assert_eq!(mock.chat(HELLO).await.status, 200);

    mock.model.set_error_rate(1.0);
    assert_eq!(mock.model.error_rate(), 1.0);
    assert_eq!(mock.chat(HELLO).await.status, 500);

    // Out-of-range values are clamped, not ignored.
    mock.model.set_error_rate(7.0);
    assert_eq!(mock.model.error_rate(), 1.0);
    mock.model.set_error_rate(-1.0);
    assert_eq!(mock.model.error_rate(), 0.0);
    assert_eq!(mock.chat(HELLO).await.status, 200);

    // A fraction fails some requests and not others.
    mock.model.set_error_rate(0.5);
    let mut codes = Vec::new();
    assert_eventually!(
        {
            codes.push(mock.chat(HELLO).await.status.as_u16());
            codes.contains(&200) && codes.contains(&500)
        },
        Duration::from_secs(5),
        "codes so far: {codes:?}"
    );
    mock.stop().await;
}

#[tokio::test]
async fn bad_requests_get_openai_style_errors_at_once() {
    // A latency far beyond the harness timeout: a 400 must not wait for it.
    let mock = Mock::start(MockOptions {
        latency: Duration::from_secs(60),
        error_rate: 1.0,
        ..MockOptions::named("strict")
    })
    .await;
    for body in ["{not json", "[1, 2]", ""] {
        let resp = mock.chat(body).await;
        assert_eq!(resp.status, 400, "{body:?}: {}", resp.text());
        assert_eq!(resp.header("x-mock-version"), Some("strict"));
        score_of(&resp);
        let error = &resp.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{body:?}");
        assert!(error["message"].is_string());
        assert!(error.get("param").is_some() && error.get("code").is_some());
    }
    assert_eq!(mock.model.faults(), 0, "client errors are not faults");

    let client = TestClient::http1();
    let resp = client.get(&mock.url("/v2/nowhere")).await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("x-mock-version"), Some("strict"));
    assert_eq!(resp.json()["error"]["type"], "invalid_request_error");

    let resp = client.get(&mock.url("/v1/chat/completions")).await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("POST"));
    mock.stop().await;
}

#[tokio::test]
async fn latency_delays_the_response_head() {
    let mock = Mock::start(MockOptions {
        chunks: 2,
        chunk_interval: Duration::ZERO,
        ..MockOptions::named("slow")
    })
    .await;
    let delay = Duration::from_millis(150);
    mock.model.set_latency(delay);
    assert_eq!(mock.model.latency(), delay);

    let started = tokio::time::Instant::now();
    assert_eq!(mock.chat(HELLO).await.status, 200);
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());

    // For a stream, the delay is time to first byte: the head itself waits.
    let req = request(Method::POST, &mock.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(support::full(r#"{"messages":[],"stream":true}"#))
        .unwrap();
    let started = tokio::time::Instant::now();
    let resp = TestClient::http1().send_streaming(req).await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());

    // Health checks are not slowed down.
    mock.model.set_latency(Duration::from_secs(60));
    assert_eq!(
        TestClient::http1()
            .get(&mock.url("/health/ready"))
            .await
            .status,
        200
    );
    mock.stop().await;
}

#[tokio::test]
async fn score_follows_mean_and_jitter() {
    let mock = Mock::start(MockOptions {
        score_mean: 0.9,
        score_jitter: 0.0,
        ..MockOptions::named("drift")
    })
    .await;
    let resp = mock.chat(HELLO).await;
    assert_eq!(score_of(&resp), 0.9);
    assert_eq!(resp.json()["score"].as_f64(), Some(0.9));

    mock.model.set_score_mean(0.3);
    assert_eq!(score_of(&mock.chat(HELLO).await), 0.3);

    mock.model.set_score_jitter(0.1);
    let scores: Vec<f64> = {
        let mut v = Vec::new();
        for _ in 0..30 {
            v.push(score_of(&mock.chat(HELLO).await));
        }
        v
    };
    assert!(scores.iter().all(|s| (0.2..=0.4).contains(s)), "{scores:?}");
    assert!(
        scores.iter().any(|s| *s != scores[0]),
        "jitter varies: {scores:?}"
    );
    mock.stop().await;
}

#[tokio::test]
async fn serves_h2c_too() {
    let mock = Mock::start(MockOptions {
        chunks: 3,
        chunk_interval: Duration::ZERO,
        ..MockOptions::named("h2")
    })
    .await;
    let client = TestClient::h2c();
    let resp = client
        .post_json(
            &mock.url("/v1/chat/completions"),
            r#"{"messages":[],"stream":true}"#,
            &[],
        )
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-mock-version"), Some("h2"));
    assert_eq!(sse_events(&resp.text()).len(), 4);
    let resp = client
        .send(
            request(Method::GET, &mock.url("/v1/models"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status, 200);
    mock.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let mock = Mock::start(MockOptions::named("bye")).await;
    assert_eq!(mock.chat(HELLO).await.status, 200);
    let addr = mock.addr;
    mock.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed once serve returns"
    );
}

#[test]
fn invalid_options_are_refused() {
    let bad = |o: MockOptions| MockModel::new(o).unwrap_err().to_string();
    assert!(bad(MockOptions::named("")).contains("name"));
    assert!(bad(MockOptions::named("has space")).contains("name"));
    let e = bad(MockOptions {
        error_rate: 1.5,
        ..MockOptions::default()
    });
    assert!(e.contains("error rate"), "{e}");
    let e = bad(MockOptions {
        score_mean: f64::NAN,
        ..MockOptions::default()
    });
    assert!(e.contains("score mean"), "{e}");
    let e = bad(MockOptions {
        score_jitter: -0.1,
        ..MockOptions::default()
    });
    assert!(e.contains("score jitter"), "{e}");
}

/// Starts the binary with `mock-model ARGS --listen 127.0.0.1:0` and returns it with the
/// line it printed and the URL in that line.
#[cfg(unix)]
async fn start_cli(args: &[&str]) -> (tokio::process::Child, String, String) {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rollgate"))
        .args(["mock-model", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start rollgate mock-model");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(REQUEST_TIMEOUT, lines.next_line())
        .await
        .expect("a line within the timeout")
        .unwrap()
        .expect("one line on stdout");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    (child, line, url)
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
#[cfg(unix)]
async fn sigterm_exits_cleanly(mut child: tokio::process::Child) {
    let pid = child.id().expect("still running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success());
    let status = tokio::time::timeout(REQUEST_TIMEOUT, child.wait())
        .await
        .expect("exits within the timeout after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The binary: prints where it listens, serves with the flags given, exits 0 on SIGTERM.
#[cfg(unix)]
#[tokio::test]
async fn cli_serves_with_its_flags_and_stops_on_sigterm() {
    let (child, line, url) = start_cli(&[
        "--name",
        "cli-v1",
        "--error-rate",
        "1",
        "--latency",
        "1ms",
        "--stream",
        "--chunks",
        "2",
        "--chunk-interval",
        "1ms",
        "--score",
        "0.5",
    ])
    .await;
    assert!(line.contains("cli-v1"), "{line}");

    let client = TestClient::http1();
    let resp = client
        .post_json(&format!("{url}/v1/chat/completions"), "{}", &[])
        .await;
    assert_eq!(resp.status, 500, "--error-rate 1");
    assert_eq!(resp.header("x-mock-version"), Some("cli-v1"));
    let score = score_of(&resp);
    assert!((0.45..=0.55).contains(&score), "--score 0.5: {score}");
    let resp = client.get(&format!("{url}/v1/models")).await;
    assert_eq!(resp.json()["data"][0]["id"], "cli-v1");

    sigterm_exits_cleanly(child).await;
}

/// A signal right after the "serving" line already finds its handler installed.
#[cfg(unix)]
#[tokio::test]
async fn cli_stops_cleanly_on_an_immediate_sigterm() {
    let (child, _, _) = start_cli(&[]).await;
    sigterm_exits_cleanly(child).await;
}

#[test]
fn cli_refuses_invalid_flags() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rollgate"))
        .args(["mock-model", "--listen", "127.0.0.1:0", "--error-rate", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error rate 2"), "{stderr}");
}
