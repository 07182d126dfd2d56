//! One request to the mock model: route by path, read and check the body, apply the faults,
//! and write an OpenAI-shaped answer.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::body::MockBody;
use super::{MockModel, MAX_REQUEST_BODY};

/// Names the model that answered, on every response.
pub const X_MOCK_VERSION: HeaderName = HeaderName::from_static("x-mock-version");
/// The numeric quality signal, on every response.
pub const X_MODEL_SCORE: HeaderName = HeaderName::from_static("x-model-score");

/// Makes completion ids unique within the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The two OpenAI inference endpoints the mock answers.
#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Chat,
    Completion,
}

/// Answers one request. Never fails: every problem becomes an HTTP error response.
pub(super) async fn handle(model: &MockModel, req: Request<Incoming>) -> Response<MockBody> {
    let score = model.draw_score();
    let mut resp = route(model, req, score).await;
    let headers = resp.headers_mut();
    headers.insert(X_MOCK_VERSION, model.inner.name_header.clone());
    headers.insert(
        X_MODEL_SCORE,
        HeaderValue::from_str(&score.to_string()).expect("an f64 prints as visible ASCII"),
    );
    resp
}

async fn route(model: &MockModel, req: Request<Incoming>, score: f64) -> Response<MockBody> {
    let endpoint = match req.uri().path() {
        "/v1/chat/completions" => Endpoint::Chat,
        "/v1/completions" => Endpoint::Completion,
        "/v1/models" => {
            return match *req.method() {
                Method::GET => models(model),
                _ => method_not_allowed("GET"),
            }
        }
        "/health" | "/health/ready" => {
            return match *req.method() {
                Method::GET => health(model),
                _ => method_not_allowed("GET"),
            }
        }
        path => {
            let message = format!("no route for {} {path}", req.method());
            return error(StatusCode::NOT_FOUND, "invalid_request_error", &message);
        }
    };
    if req.method() != Method::POST {
        return method_not_allowed("POST");
    }
    model.inner.requests.fetch_add(1, Relaxed);

    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            let message = format!("request body exceeds {MAX_REQUEST_BODY} bytes");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                &message,
            );
        }
        Err(e) => {
            let message = format!("could not read the request body: {e}");
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
        }
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the request body must be a JSON object",
            )
        }
        Err(e) => {
            let message = format!("the request body is not valid JSON: {e}");
            return error(StatusCode::BAD_REQUEST, "invalid_request_error", &message);
        }
    };
    let stream = match request.get("stream") {
        None | Some(Value::Null) => model.inner.stream_default,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "`stream` must be a boolean",
            )
        }
    };

    // Faults, in the order a slow and flaky server shows them: late, then maybe wrong.
    let latency = model.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let error_rate = model.error_rate();
    if error_rate > 0.0 && fastrand::f64() < error_rate {
        model.inner.faults.fetch_add(1, Relaxed);
        let message = format!("injected fault (error_rate {error_rate})");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &message);
    }

    let answer = Answer::new(model, endpoint, &request, score);
    if stream {
        answer.stream(model)
    } else {
        answer.whole()
    }
}

/// What a completion says, shared by the whole and the streamed form.
struct Answer {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    words: Vec<String>,
    prompt_tokens: usize,
    score: f64,
}

impl Answer {
    fn new(model: &MockModel, endpoint: Endpoint, request: &Value, score: f64) -> Answer {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        let id = format!("{prefix}-mock-{}", NEXT_ID.fetch_add(1, Relaxed));
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        const SAYING: [&str; 6] = ["This", "is", "a", "mock", "reply", "from"];
        let words = (0..model.inner.chunks as usize)
            .map(|i| match SAYING.get(i % (SAYING.len() + 1)) {
                Some(w) => (*w).to_owned(),
                None => model.name().to_owned(),
            })
            .collect();
        Answer {
            endpoint,
            id,
            created,
            model: model.name().to_owned(),
            words,
            prompt_tokens: prompt_tokens(endpoint, request),
            score,
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.words.len(),
            "total_tokens": self.prompt_tokens + self.words.len(),
        })
    }

    /// The non-streaming answer: one JSON object.
    fn whole(self) -> Response<MockBody> {
        let text = self.words.join(" ");
        let (object, choice) = match self.endpoint {
            Endpoint::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": "stop",
                }),
            ),
            Endpoint::Completion => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "stop"}),
            ),
        };
        let body = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
            "score": self.score,
        });
        json_response(StatusCode::OK, &body)
    }

    /// The streaming answer: one SSE event per word, the last with `finish_reason: "stop"`,
    /// then `data: [DONE]`.
    fn stream(self, model: &MockModel) -> Response<MockBody> {
        let last = self.words.len().saturating_sub(1);
        let events = self
            .words
            .iter()
            .enumerate()
            .map(|(i, word)| {
                let text = if i == last {
                    word.clone()
                } else {
                    format!("{word} ")
                };
                let finish = if i == last { json!("stop") } else { Value::Null };
                let (object, choice) = match self.endpoint {
                    Endpoint::Chat => {
                        let delta = if i == 0 {
                            json!({"role": "assistant", "content": text})
                        } else {
                            json!({"content": text})
                        };
                        (
                            "chat.completion.chunk",
                            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
                        )
                    }
                    Endpoint::Completion => (
                        "text_completion",
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
                    ),
                };
                let chunk = json!({
                    "id": self.id,
                    "object": object,
                    "created": self.created,
                    "model": self.model,
                    "choices": [choice],
                    "score": self.score,
                });
                Bytes::from(format!("data: {chunk}\n\n"))
            })
            .collect();
        let body = MockBody::paced(
            events,
            Bytes::from_static(b"data: [DONE]\n\n"),
            model.inner.chunk_interval,
        );
        Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "text/event-stream")
            .header(CACHE_CONTROL, "no-cache")
            .body(body)
            .expect("static headers are valid")
    }
}

/// A rough token count of the prompt (whitespace-separated words), enough for `usage`.
fn prompt_tokens(endpoint: Endpoint, request: &Value) -> usize {
    let words = |v: &Value| v.as_str().map_or(0, |s| s.split_whitespace().count());
    match endpoint {
        Endpoint::Chat => request
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, |messages| {
                messages
                    .iter()
                    .filter_map(|m| m.get("content"))
                    .map(words)
                    .sum()
            }),
        Endpoint::Completion => match request.get("prompt") {
            Some(Value::Array(prompts)) => prompts.iter().map(words).sum(),
            Some(prompt) => words(prompt),
            None => 0,
        },
    }
}

fn models(model: &MockModel) -> Response<MockBody> {
    let body = json!({
        "object": "list",
        "data": [{
            "id": model.name(),
            "object": "model",
            "created": 0,
            "owned_by": "rollgate-mock",
        }],
    });
    json_response(StatusCode::OK, &body)
}

fn health(model: &MockModel) -> Response<MockBody> {
    if model.healthy() {
        json_response(StatusCode::OK, &json!({"status": "ok"}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unhealthy"}),
        )
    }
}

fn method_not_allowed(allow: &'static str) -> Response<MockBody> {
    let message = format!("use {allow} on this path");
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        &message,
    );
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    resp
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
fn error(status: StatusCode, kind: &str, message: &str) -> Response<MockBody> {
    let body = json!({
        "error": {"message": message, "type": kind, "param": null, "code": null},
    });
    json_response(status, &body)
}

fn json_response(status: StatusCode, body: &Value) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(MockBody::full(body.to_string()))
        .expect("static headers are valid")
}
