//! `RedisServer`: a real `redis-server` (the Debian package) on a free loopback port, for the
//! fleet tests, plus a small RESP client so tests need no Redis crate.
//!
//! ```ignore
//! let redis = RedisServer::start().await;
//! assert_eq!(redis.cmd(&["SET", "k", "v"]).await, RespValue::ok());
//! redis.stop(); // the store goes away; the port stays reserved in `redis`
//! redis.start_again().await; // same port, empty data: a non-persistent Redis restarted
//! ```
//!
//! A missing `redis-server`, or one that does not answer PING within [`START_TIMEOUT`], fails
//! the test with a message (never a skip): `.ci/run` installs it. The server runs without
//! persistence (`--save "" --appendonly no`) in its own temp dir; its log goes to a file there,
//! printed when it fails to start. Drop kills it.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a (re)start may take before the test fails, including retries while the port is
/// still held (TIME_WAIT, or another process that took it meanwhile).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on one command: connect, write, read the whole reply.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(5);

/// The binary, found on `PATH`.
const BINARY: &str = "redis-server";

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RespValue {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`: a command Redis refused (not an I/O failure).
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`
    Null,
    /// `*2\r\n...`, elements of any kind (nested arrays included).
    Array(Vec<RespValue>),
}

impl RespValue {
    /// `+OK`, to compare with.
    pub fn ok() -> RespValue {
        RespValue::Simple("OK".to_string())
    }

    /// A simple string or a bulk string (lossily decoded) as text; `None` otherwise.
    pub fn as_text(&self) -> Option<String> {
        match self {
            RespValue::Simple(s) => Some(s.clone()),
            RespValue::Bulk(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            RespValue::Integer(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[RespValue]> {
        match self {
            RespValue::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, RespValue::Null)
    }
}

/// Parses one RESP2 value at the start of `buf`: `Ok(Some((value, bytes used)))`, `Ok(None)`
/// when `buf` holds only part of it, `Err` when it is not RESP.
pub fn parse_resp(buf: &[u8]) -> Result<Option<(RespValue, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, rest)) = buf[..end].split_first() else {
        return Err("empty line where a RESP value was expected".to_string());
    };
    let line = std::str::from_utf8(rest).map_err(|e| format!("RESP line not UTF-8: {e}"))?;
    let after = end + 2;
    let number = || {
        line.parse::<i64>()
            .map_err(|e| format!("bad RESP length or integer {line:?}: {e}"))
    };
    match kind {
        b'+' => Ok(Some((RespValue::Simple(line.to_string()), after))),
        b'-' => Ok(Some((RespValue::Error(line.to_string()), after))),
        b':' => Ok(Some((RespValue::Integer(number()?), after))),
        b'$' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((RespValue::Null, after)));
            }
            let len = len as usize;
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            if &buf[after + len..after + len + 2] != b"\r\n" {
                return Err("bulk string not followed by CRLF".to_string());
            }
            let data = buf[after..after + len].to_vec();
            Ok(Some((RespValue::Bulk(data), after + len + 2)))
        }
        b'*' => {
            let len = number()?;
            if len < 0 {
                return Ok(Some((RespValue::Null, after)));
            }
            let mut items = Vec::with_capacity(len.min(1024) as usize);
            let mut used = after;
            for _ in 0..len {
                match parse_resp(&buf[used..])? {
                    Some((item, n)) => {
                        items.push(item);
                        used += n;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((RespValue::Array(items), used)))
        }
        other => Err(format!(
            "unknown RESP type byte {:?} in {:?}",
            other as char,
            String::from_utf8_lossy(&buf[..end])
        )),
    }
}

/// `args` as a RESP array of bulk strings (how clients send commands).
fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Sends `commands` in order on one fresh connection to `addr` and reads one reply each.
async fn send_commands(addr: SocketAddr, commands: &[&[&str]]) -> Result<Vec<RespValue>, String> {
    let fut = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request: Vec<u8> = commands.iter().flat_map(|c| encode_command(c)).collect();
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut replies = Vec::with_capacity(commands.len());
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        while replies.len() < commands.len() {
            if let Some((value, used)) = parse_resp(&buf)? {
                replies.push(value);
                buf.drain(..used);
                continue;
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "connection closed after {} of {} replies",
                    replies.len(),
                    commands.len()
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(replies)
    };
    match tokio::time::timeout(CMD_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| format!("redis {commands:?} at {addr}: {e}")),
        Err(_) => Err(format!(
            "redis {commands:?} at {addr}: no reply within {CMD_TIMEOUT:?}"
        )),
    }
}

/// One command on a fresh connection.
async fn send_command(addr: SocketAddr, args: &[&str]) -> Result<RespValue, String> {
    let mut replies = send_commands(addr, &[args]).await?;
    Ok(replies.remove(0))
}

/// A running (or stopped) `redis-server` child on a port this struct keeps.
pub struct RedisServer {
    port: u16,
    /// The current process and its temp dir (`None` after [`RedisServer::stop`]). A mutex
    /// so `stop` and `start_again` take `&self` and a test can share the server (uncontended:
    /// held only to swap the child, never across an `.await`).
    running: Mutex<Option<Running>>,
}

struct Running {
    child: Child,
    dir: tempfile::TempDir,
}

impl Running {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    /// Starts `redis-server` on a free loopback port and waits until it answers PING.
    /// Panics when the binary is missing or does not come up within [`START_TIMEOUT`].
    pub async fn start() -> RedisServer {
        let port = free_port();
        let server = RedisServer {
            port,
            running: Mutex::new(None),
        };
        server.start_again().await;
        server
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn is_running(&self) -> bool {
        self.running.lock().unwrap().is_some()
    }

    /// Kills the server (SIGKILL, as a crash or a lost node) and waits for it to exit. The
    /// port stays this server's, for [`RedisServer::start_again`]. No-op when stopped.
    pub fn stop(&self) {
        let running = self.running.lock().unwrap().take();
        if let Some(r) = running {
            r.kill();
        }
    }

    /// Starts the server again on the same port with empty data, as a restarted Redis without
    /// persistence would come back; stops it first if it is running. Retries while the port is
    /// still taken, for up to [`START_TIMEOUT`] in all; panics after that.
    pub async fn start_again(&self) {
        self.stop();
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let running = spawn_redis(self.port);
            let log_path = running.log_path();
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            *self.running.lock().unwrap() = Some(running);
            // Poll: PING answered (up), the process gone (failed), or the deadline.
            let exited = loop {
                if let Ok(RespValue::Simple(pong)) = send_command(self.addr(), &["PING"]).await {
                    if pong == "PONG" {
                        return;
                    }
                }
                let status = {
                    let mut guard = self.running.lock().unwrap();
                    let r = guard.as_mut().expect("redis child");
                    r.child.try_wait().expect("try_wait on redis-server")
                };
                if let Some(status) = status {
                    break status;
                }
                if tokio::time::Instant::now() >= deadline {
                    let text = log();
                    self.stop();
                    panic!(
                        "redis-server on port {} did not answer PING within {START_TIMEOUT:?} \
                         (attempt {attempt}); its log:\n{text}",
                        self.port
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let text = log();
            self.stop();
            let port_taken = text.contains("Address already in use");
            if port_taken && tokio::time::Instant::now() < deadline {
                // TIME_WAIT or a passer-by on the port: try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            panic!(
                "redis-server on port {} exited ({exited}) before answering PING \
                 (attempt {attempt}); its log:\n{text}",
                self.port
            );
        }
    }

    /// Sends one command on a fresh connection (so connection state such as `MULTI` or
    /// `SELECT` does not carry over: see [`RedisServer::pipeline`]) and returns the reply (a refused command is
    /// `RespValue::Error`, not a failure). Panics when the server cannot be reached or does
    /// not answer within [`CMD_TIMEOUT`].
    pub async fn cmd(&self, args: &[&str]) -> RespValue {
        self.try_cmd(args).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`RedisServer::cmd`], with connection and protocol failures as `Err`.
    pub async fn try_cmd(&self, args: &[&str]) -> Result<RespValue, String> {
        send_command(self.addr(), args).await
    }

    /// Several commands in order on one connection (so `MULTI` .. `EXEC` works), one reply
    /// each. Panics like [`RedisServer::cmd`].
    pub async fn pipeline(&self, commands: &[&[&str]]) -> Vec<RespValue> {
        send_commands(self.addr(), commands)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `KEYS pattern`, sorted.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let reply = self.cmd(&["KEYS", pattern]).await;
        let mut keys: Vec<String> = reply
            .as_array()
            .unwrap_or_else(|| panic!("KEYS {pattern}: not an array: {reply:?}"))
            .iter()
            .map(|k| {
                k.as_text()
                    .unwrap_or_else(|| panic!("KEYS {pattern}: not a string: {k:?}"))
            })
            .collect();
        keys.sort();
        keys
    }

    /// The server's log so far (empty when stopped).
    pub fn log_text(&self) -> String {
        let guard = self.running.lock().unwrap();
        guard
            .as_ref()
            .map(|r| std::fs::read_to_string(r.log_path()).unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.running.lock() {
            if let Some(r) = guard.take() {
                r.kill();
            }
        }
    }
}

/// A port the kernel just gave out on 127.0.0.1, released for the caller to bind.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Spawns `redis-server` on `port` in a fresh temp dir, its output to `redis.log` there.
fn spawn_redis(port: u16) -> Running {
    let dir = tempfile::tempdir().expect("temp dir for redis");
    let log = std::fs::File::create(dir.path().join("redis.log")).expect("redis log file");
    let log_err = log.try_clone().expect("clone redis log file");
    let child = Command::new(BINARY)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {BINARY} ({e}): the fleet tests need a real Redis; install the \
                 Debian package redis-server (.ci/run does)"
            )
        });
    Running { child, dir }
}
