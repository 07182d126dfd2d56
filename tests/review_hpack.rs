//! Hostile review of "the request id is sent as a literal never indexed" (203c1a9, cdd34ce):
//! try to make h2's HPACK encoder meet a sensitive value on a path that asserts it is not
//! (`encode_header`, `Inserted` / `InsertedValue`), on both of rollgate's encoders: the
//! client connection's (responses) and the h2c upstream connection's (requests).

#[macro_use]
mod support;

use bytes::Bytes;
use support::h2raw;
use support::raw_upstream::{Fault, RawUpstream};
use support::*;

/// `get_heads` with owned extra fields; every response must be a 200.
async fn run(
    proxy: &TestProxy,
    settings: &[(u16, u32)],
    requests: &[Vec<(&str, String)>],
) -> Vec<h2raw::Head> {
    let requests: Vec<Vec<(&str, &str)>> = requests
        .iter()
        .map(|extra| extra.iter().map(|(n, v)| (*n, v.as_str())).collect())
        .collect();
    let heads = h2raw::get_heads(proxy.data_addr(), settings, &requests).await;
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(h.values(":status"), ["200"], "request {i}: {h:?}");
    }
    heads
}

/// Request ids meant to corner the encoder: repeated (a full match in the table if any
/// entry of that name were there), twice in one request, equal to other fields' values,
/// at the 128-byte limit and just over it, empty, and long enough to be "large" for a small
/// table.
fn nasty_requests() -> Vec<Vec<(&'static str, String)>> {
    let mut reqs = Vec::new();
    for round in 0..3 {
        reqs.push(vec![]);
        reqs.push(vec![("x-request-id", "same".to_string())]);
        reqs.push(vec![("x-request-id", "same".to_string())]);
        reqs.push(vec![
            ("x-request-id", "first".to_string()),
            ("x-request-id", "second".to_string()),
        ]);
        reqs.push(vec![
            ("x-request-id", "same".to_string()),
            ("x-request-id", "same".to_string()),
        ]);
        reqs.push(vec![("x-request-id", "v1".to_string())]);
        reqs.push(vec![("x-request-id", "text/plain".to_string())]);
        reqs.push(vec![("x-request-id", "application/json".to_string())]);
        reqs.push(vec![("x-request-id", "x".repeat(128))]);
        reqs.push(vec![("x-request-id", "y".repeat(129))]);
        reqs.push(vec![("x-request-id", String::new())]);
        reqs.push(vec![("x-request-id", format!("round-{round}"))]);
    }
    reqs
}

fn assert_never_indexed(heads: &[h2raw::Head], what: &str) {
    for (i, h) in heads.iter().enumerate() {
        assert!(
            !h.values("x-request-id").is_empty(),
            "{what}: response {i} has no x-request-id"
        );
        assert!(
            h.never_indexed("x-request-id"),
            "{what}: response {i}: the request id was not sent never indexed: {h:?}"
        );
    }
}

/// The client connection's encoder, ids from the client (or generated), under the default
/// table and under tables the client shrank (0, and smaller than one id entry).
#[tokio::test]
async fn h2_client_ids_never_reach_an_asserting_encoder_path() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::to(&up.http_url()).await;
    for settings in [
        vec![],
        vec![(0x1, 0)],
        vec![(0x1, 40)],
        vec![(0x1, 100)],
        vec![(0x1, 256)],
    ] {
        let heads = run(&proxy, &settings, &nasty_requests()).await;
        assert_never_indexed(&heads, &format!("settings {settings:?}"));
        // Ids come back as sent (the first of two), generated when absent, empty or too long.
        assert_eq!(heads[1].values("x-request-id"), ["same"]);
        assert_eq!(heads[3].values("x-request-id"), ["first"]);
        assert_eq!(heads[8].values("x-request-id"), ["x".repeat(128)]);
        assert_ne!(heads[9].values("x-request-id"), ["y".repeat(129)]);
    }
    proxy.shutdown().await;
}

/// The client connection's encoder, ids from an upstream that sends two x-request-id
/// fields (all of them marked sensitive by `respond`), and values that equal other
/// fields' values.
#[tokio::test]
async fn h2_upstream_sending_two_ids_neither_panics_nor_indexes() {
    for own in [
        "x-request-id: up-1\r\nx-request-id: up-2\r\n",
        "x-request-id: same\r\nx-request-id: same\r\n",
        "x-request-id: text/plain\r\n",
        "x-request-id: \r\n",
    ] {
        let raw = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{own}content-length: 2\r\n\r\nok"
        );
        let up = RawUpstream::start(Fault::Respond(Bytes::from(raw))).await;
        let proxy = TestProxy::to(&up.url()).await;
        for settings in [vec![], vec![(0x1, 0)], vec![(0x1, 60)]] {
            let heads = run(&proxy, &settings, &nasty_requests()).await;
            assert_never_indexed(&heads, &format!("upstream {own:?}, settings {settings:?}"));
            if own.contains("up-2") {
                assert_eq!(
                    heads[0].values("x-request-id"),
                    ["up-1", "up-2"],
                    "both of the upstream's ids"
                );
            }
        }
        proxy.shutdown().await;
    }
}

/// rollgate's own encoder towards an h2c upstream: the request id goes into every
/// upstream request (and is sensitive there too). Many requests over the pooled upstream
/// connection with repeated, doubled and odd ids.
#[tokio::test]
async fn h2c_upstream_requests_with_sensitive_ids_keep_flowing() {
    let up = TestUpstream::start("v1").await;
    let proxy = TestProxy::to(&up.h2c_url()).await;
    let heads = run(&proxy, &[], &nasty_requests()).await;
    assert_never_indexed(&heads, "h2c upstream");
    let client = TestClient::h2c();
    for i in 0..200 {
        let id = match i % 4 {
            0 => "same".to_string(),
            1 => format!("id-{i}"),
            2 => "v1".to_string(),
            _ => "z".repeat(128),
        };
        let r = client
            .get_with(&proxy.url("/v1/chat"), &[("x-request-id", &id)])
            .await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    }
    let seen = up
        .requests()
        .iter()
        .filter(|r| r.header("x-request-id").as_deref() == Some("same"))
        .count();
    assert!(seen > 0, "the upstream saw the client's id");
    proxy.shutdown().await;
}
