//! Test harness for rollgate's integration tests: real sockets on port 0, real upstreams that can
//! be told to misbehave, a proxy builder, a small client, and `assert_eventually!`; for the fleet
//! tests, a real `redis-server` and `rollgate` replicas in child processes.
//!
//! Each test file that uses it says `#[macro_use] mod support;`. Nothing here sleeps to wait for
//! something: waits are polls with a deadline.
#![allow(dead_code, unused_macros, unused_imports)]

// The macros first: macro_rules are in scope from their definition on, and the
// modules below use them too.
/// Polls `cond` (which may contain `.await`) every 50 ms for `duration`, panicking the first
/// time it does not hold: for "nothing happens" over a span (no step, no promote), checked
/// throughout rather than once after a sleep.
macro_rules! assert_always {
    ($cond:expr, $duration:expr $(,)?) => {
        assert_always!($cond, $duration, "{}", stringify!($cond))
    };
    ($cond:expr, $duration:expr, $($msg:tt)+) => {{
        let duration: ::std::time::Duration = $duration;
        let deadline = ::tokio::time::Instant::now() + duration;
        while ::tokio::time::Instant::now() < deadline {
            if !$cond {
                panic!("assert_always: stopped holding within {:?}: {}", duration, format!($($msg)+));
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(50)).await;
        }
    }};
}

/// Polls `cond` (which may contain `.await`) every 20 ms until it holds, panicking after
/// `timeout`. Optional trailing arguments are a `format!` message printed on timeout.
macro_rules! assert_eventually {
    ($cond:expr, $timeout:expr $(,)?) => {
        assert_eventually!($cond, $timeout, "{}", stringify!($cond))
    };
    ($cond:expr, $timeout:expr, $($msg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        let deadline = ::tokio::time::Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            if ::tokio::time::Instant::now() >= deadline {
                panic!("assert_eventually: not true within {:?}: {}", timeout, format!($($msg)+));
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(20)).await;
        }
    }};
}

pub mod body;
pub mod certs;
pub mod client;
pub mod h2raw;
pub mod instance;
pub mod load;
pub mod metrics;
pub mod proxy;
pub mod raw_upstream;
pub mod redis;
pub mod replica;
pub mod sim;
pub mod upstream;

pub use body::ChannelBody;
pub use certs::{tls_connect, write_tls_files, TestCa};
pub use client::{
    empty, full, open_get, raw_http1, read_until, request, ReqBody, TestClient, TestResponse,
};
pub use instance::{instance_yaml, Instance};
pub use load::Load;
pub use metrics::metric_sum;
pub use proxy::{
    audit_records_in, json_lines, proxy_with_access_log, save_like_an_editor, Route, TestProxy,
    TestProxyBuilder,
};
pub use redis::{RedisServer, RespValue};
pub use replica::{Replica, ReplicaBuilder};
pub use upstream::{closed_port, grpc_frame, sse_body, RecordedRequest, Reply, TestUpstream};

/// Upper bound for any single request made by the harness; a proxy that hangs fails the test
/// instead of hanging it.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
