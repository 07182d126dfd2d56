//! Webhook alerts: a JSON POST to every webhook whose `min_severity` the event meets.
//! Off the request path, each attempt bounded by a timeout, retried a bounded number of
//! times; every result is returned so the audit record can carry it.

use std::time::Duration;

use http::{header, Method, Request};
use serde::Serialize;

use crate::config::{Severity, Webhook};
use crate::proxy::body::ReqBody;
use crate::proxy::client::HttpClient;

/// Time one delivery attempt may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per webhook (the first plus retries with doubling back-off from 200 ms).
pub const ATTEMPTS: u32 = 3;

/// One webhook's delivery outcome, as `alerts_sent` in audit records.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertResult {
    pub url: String,
    /// Final HTTP status, if any response came back.
    pub status: Option<u16>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sends alerts to the configured webhooks.
#[derive(Clone)]
pub struct Alerts {
    client: HttpClient,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Alerts")
    }
}

impl Alerts {
    pub fn new() -> std::io::Result<Alerts> {
        Ok(Alerts {
            client: crate::proxy::client::control_client()?,
        })
    }

    /// Delivers `payload` to every webhook that wants `severity`, concurrently.
    pub async fn send(
        &self,
        webhooks: &[Webhook],
        severity: Severity,
        payload: &serde_json::Value,
    ) -> Vec<AlertResult> {
        let body = bytes::Bytes::from(serde_json::to_vec(payload).unwrap_or_default());
        let mut set = tokio::task::JoinSet::new();
        for (i, w) in webhooks
            .iter()
            .enumerate()
            .filter(|(_, w)| severity >= w.min_severity)
        {
            let client = self.client.clone();
            let url = w.url.clone();
            let body = body.clone();
            set.spawn(async move { (i, deliver(&client, url, body).await) });
        }
        let mut results: Vec<(usize, AlertResult)> = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(r) = r {
                results.push(r);
            }
        }
        results.sort_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    }
}

async fn deliver(client: &HttpClient, url: String, body: bytes::Bytes) -> AlertResult {
    let mut backoff = Duration::from_millis(200);
    let mut last = AlertResult {
        url: url.clone(),
        status: None,
        attempts: 0,
        error: None,
    };
    for attempt in 1..=ATTEMPTS {
        last.attempts = attempt;
        let req = Request::builder()
            .method(Method::POST)
            .uri(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("rollgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(ReqBody::full(body.clone(), None));
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                last.error = Some(e.to_string());
                return last;
            }
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req)).await {
            Ok(Ok(resp)) => {
                let status = resp.status();
                last.status = Some(status.as_u16());
                last.error = None;
                if status.is_success() || status.is_client_error() {
                    // 4xx will not get better by retrying.
                    return last;
                }
            }
            Ok(Err(e)) => last.error = Some(e.to_string()),
            Err(_) => last.error = Some(format!("timed out after {ATTEMPT_TIMEOUT:?}")),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    last
}
