//! The fleet tests' harness checked on its own: `RedisServer` (a real redis-server: start,
//! commands over the RESP client, stop, restart on the same port with empty data, the parser
//! on split and nested replies) and `Replica` (the rollgate binary in a child process: ready,
//! serving, its admin API with a token, its audit log, SIGTERM, restart in place).
//!
//! Without `redis-server` installed these tests fail (they do not skip): `.ci/run` installs it.

#[macro_use]
mod support;

use std::time::Duration;

use support::redis::parse_resp;
use support::{RedisServer, Replica, RespValue, TestClient, TestUpstream};

#[tokio::test]
async fn redis_server_answers_commands() {
    let redis = RedisServer::start().await;
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
    assert_eq!(redis.cmd(&["PING"]).await, RespValue::Simple("PONG".into()));
    assert_eq!(
        redis.cmd(&["SET", "fleet:a", "one two"]).await,
        RespValue::ok()
    );
    assert_eq!(
        redis.cmd(&["GET", "fleet:a"]).await,
        RespValue::Bulk(b"one two".to_vec())
    );
    assert_eq!(redis.cmd(&["GET", "fleet:missing"]).await, RespValue::Null);
    assert_eq!(redis.cmd(&["INCR", "fleet:n"]).await, RespValue::Integer(1));
    assert!(
        matches!(redis.cmd(&["INCR", "fleet:a"]).await, RespValue::Error(ref e) if e.starts_with("ERR")),
        "INCR on a non-number is a RESP error"
    );
    assert_eq!(
        redis.cmd(&["RPUSH", "fleet:l", "x", "", "z"]).await,
        RespValue::Integer(3)
    );
    assert_eq!(
        redis.cmd(&["LRANGE", "fleet:l", "0", "-1"]).await,
        RespValue::Array(vec![
            RespValue::Bulk(b"x".to_vec()),
            RespValue::Bulk(Vec::new()),
            RespValue::Bulk(b"z".to_vec()),
        ])
    );
    assert_eq!(
        redis.keys("fleet:*").await,
        vec!["fleet:a", "fleet:l", "fleet:n"]
    );
    // One connection for a transaction; EXEC's reply nests one reply per queued command.
    let replies = redis
        .pipeline(&[
            &["MULTI"],
            &["INCR", "fleet:n"],
            &["LRANGE", "fleet:l", "0", "0"],
            &["EXEC"],
        ])
        .await;
    assert_eq!(
        replies.last(),
        Some(&RespValue::Array(vec![
            RespValue::Integer(2),
            RespValue::Array(vec![RespValue::Bulk(b"x".to_vec())]),
        ])),
        "{replies:?}"
    );
}

#[tokio::test]
async fn stop_makes_commands_fail_and_start_again_serves_empty_data_on_the_same_port() {
    let redis = RedisServer::start().await;
    let port = redis.port();
    assert_eq!(redis.cmd(&["SET", "k", "v"]).await, RespValue::ok());

    redis.stop();
    assert!(!redis.is_running());
    let err = redis
        .try_cmd(&["PING"])
        .await
        .expect_err("a stopped server answered");
    assert!(err.contains("connect"), "{err}");

    redis.start_again().await;
    assert_eq!(redis.port(), port);
    assert_eq!(redis.cmd(&["GET", "k"]).await, RespValue::Null);
    assert!(redis.keys("*").await.is_empty());
    assert_eq!(redis.cmd(&["SET", "k", "w"]).await, RespValue::ok());

    // Restarting a running server works the same way.
    redis.start_again().await;
    assert_eq!(redis.port(), port);
    assert!(redis.keys("*").await.is_empty());
}

#[test]
fn resp_parser_handles_partial_nested_and_null_replies() {
    let reply = b"*3\r\n*2\r\n:1\r\n$-1\r\n+OK\r\n*-1\r\n";
    let (value, used) = parse_resp(reply).unwrap().unwrap();
    assert_eq!(used, reply.len());
    assert_eq!(
        value,
        RespValue::Array(vec![
            RespValue::Array(vec![RespValue::Integer(1), RespValue::Null]),
            RespValue::Simple("OK".into()),
            RespValue::Null,
        ])
    );
    // Every proper prefix is incomplete, never an error or a wrong value.
    for end in 0..reply.len() {
        assert_eq!(parse_resp(&reply[..end]), Ok(None), "prefix of {end} bytes");
    }
    // A bulk string may contain CRLF.
    let (value, _) = parse_resp(b"$4\r\na\r\nb\r\n").unwrap().unwrap();
    assert_eq!(value, RespValue::Bulk(b"a\r\nb".to_vec()));
    assert!(parse_resp(b"?what\r\n").is_err());
}

#[tokio::test]
async fn replica_runs_the_binary_with_its_name_token_and_state_dir() {
    let stable = TestUpstream::start("stable").await;
    let canary = TestUpstream::start("canary").await;
    let yaml = format!(
        "drain_timeout: 2s\n\
         evaluator: {{min_requests: 1000000}}\n\
         versions:\n  \
           stable: {{endpoints: [\"{}\"]}}\n  \
           canary: {{endpoints: [\"{}\"]}}\n\
         routes:\n  \
           - {{name: chat, match: {{path_prefix: /}}, baseline: stable, split: {{stable: 50, canary: 50}}}}\n",
        stable.http_url(),
        canary.http_url()
    );
    let mut replica = Replica::builder("replica-a", &yaml)
        .admin_token("s3cret")
        .start()
        .await;
    assert!(replica.is_running());
    assert_eq!(replica.name(), "replica-a");

    let client = TestClient::http1();
    let r = client.get(&replica.url("/v1/chat")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Without the token a change is refused; the replica's admin_post sends it.
    let refused = client
        .post_json(
            &replica.admin_url("/api/v1/rollback"),
            r#"{"route": "chat", "version": "canary"}"#,
            &[],
        )
        .await;
    assert_eq!(refused.status, 401, "{}", refused.text());
    let r = replica
        .admin_post(
            "/api/v1/rollback",
            r#"{"route": "chat", "version": "canary", "operator": "harness"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let records = replica.audit_records();
    assert!(
        records.iter().any(|rec| rec["id"] == id.as_str()),
        "rollback {id} not in the audit log: {records:#?}"
    );
    let status = replica.status_json().await;
    assert!(
        status.to_string().contains("canary"),
        "status names the versions: {status:#}"
    );

    // A restart in place keeps the state_dir (and so the quarantine), on new ports.
    replica.restart().await;
    let after = replica.audit_records();
    assert!(
        after.iter().any(|rec| rec["id"] == id.as_str()),
        "rollback {id} not in the audit log after the restart: {after:#?}"
    );
    assert_eventually!(
        client.get(&replica.url("/v1/chat")).await.version() == Some("stable"),
        Duration::from_secs(5)
    );
    for _ in 0..20 {
        let r = client.get(&replica.url("/v1/chat")).await;
        assert_eq!(r.version(), Some("stable"), "the canary stays rolled back");
    }

    let status = replica.stop().await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(!replica.is_running());
    assert!(
        replica.stderr_text().contains("rollgate serving"),
        "{}",
        replica.stderr_text()
    );
}
