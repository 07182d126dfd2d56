//! `RawUpstream`: a fault-injecting upstream on a raw TCP listener, standing in for Toxiproxy
//! (whose server is Go). It speaks just enough HTTP/1.1 to frame requests
//! (`Content-Length` or chunked), records the exact bytes every connection delivered, and then
//! misbehaves as told by its [`Fault`]: answer with arbitrary (malformed) bytes, hold the
//! request forever, answer late, drip, send half a body and reset (`SO_LINGER 0`), reset right
//! after the request, push data faster than the proxy can pass it on, or close idle keep-alive
//! connections like gunicorn. A refused connection is [`refused_url`] (a closed port).
//!
//! Nothing is parsed leniently on the way in: bytes are recorded before any parsing, so a test
//! can assert on exactly what the proxy put on the wire.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// What the upstream does once a request has arrived. Change it at runtime with
/// [`RawUpstream::set`]; each connection reads it afresh for every request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Writes these bytes verbatim after every complete request and keeps the connection
    /// (keep-alive). Use [`ok_response`] for a well-formed answer.
    Respond(Bytes),
    /// Writes these bytes after the request, then closes the connection (FIN).
    RespondAndClose(Bytes),
    /// Reads and records the request, never answers, and keeps reading until the peer closes.
    Hold,
    /// Waits this long after the request, then answers [`ok_response`]`("late")`. Notices
    /// (and records) a peer that gives up meanwhile.
    DelayFirstByte(Duration),
    /// Writes `head`, then `chunk` every `every`, until the peer goes away.
    Drip {
        head: Bytes,
        chunk: Bytes,
        every: Duration,
    },
    /// Writes `head` and `body_part` (e.g. headers announcing 1000 bytes and 500 of them),
    /// waits 100 ms so the proxy has them, then resets the connection (`SO_LINGER 0`).
    ResetMidBody { head: Bytes, body_part: Bytes },
    /// Resets the connection (`SO_LINGER 0`) as soon as the whole request has arrived.
    ResetAfterRequest,
    /// Answers a chunked 200 and pushes 64 KiB chunks as fast as the peer takes them, until a
    /// write fails ([`RawConn::write_failed`]); [`RawUpstream::pushed_bytes`] counts them.
    Firehose,
    /// Answers [`ok_response`]`("ok")` and keeps the connection, like gunicorn with
    /// `keepalive = idle`: a request that arrives on a connection idle for `idle` or longer is
    /// dropped unanswered and the connection closed. That is the race a real server's
    /// keep-alive close loses against a request already in flight, made deterministic:
    /// a proxy whose pool reuses connections idle for longer than the upstream's keep-alive
    /// gets `IncompleteMessage` every time. Counted in [`RawConn::late_requests`].
    KeepAliveIdle(Duration),
}

/// One request as it arrived, framed by its own `Content-Length` / chunked encoding.
#[derive(Clone, Debug)]
pub struct RawRequest {
    /// Index of the connection it arrived on.
    pub conn: usize,
    /// The head exactly as received, up to and including the blank line.
    pub head: Vec<u8>,
    /// The body (de-chunked), as far as it arrived.
    pub body: Vec<u8>,
    /// The body ended as framed (for chunked: the `0\r\n\r\n` terminator arrived).
    pub complete: bool,
}

impl RawRequest {
    pub fn head_text(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }

    /// `GET /path HTTP/1.1`
    pub fn request_line(&self) -> String {
        self.head_text().lines().next().unwrap_or("").to_string()
    }

    /// The request target of the request line.
    pub fn target(&self) -> String {
        self.request_line()
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .to_string()
    }

    /// Every header line as (lowercased name, trimmed value), in order.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.head_text()
            .split('\n')
            .skip(1)
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                let (n, v) = l.split_once(':')?;
                Some((n.to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect()
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.headers()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// How many header lines are named `name`.
    pub fn header_count(&self, name: &str) -> usize {
        let name = name.to_ascii_lowercase();
        self.headers().iter().filter(|(n, _)| *n == name).count()
    }
}

/// One accepted connection.
#[derive(Clone, Debug, Default)]
pub struct RawConn {
    /// Every byte received, in order.
    pub bytes: Vec<u8>,
    /// Still open on our side.
    pub open: bool,
    /// The peer closed (EOF) or reset the connection.
    pub peer_closed: bool,
    /// A write of ours failed (the peer is gone).
    pub write_failed: bool,
    /// Requests dropped by [`Fault::KeepAliveIdle`].
    pub late_requests: usize,
}

#[derive(Default)]
struct State {
    conns: Vec<RawConn>,
    requests: Vec<RawRequest>,
    pushed: u64,
}

struct Shared {
    fault: Mutex<Fault>,
    state: Mutex<State>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct RawUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        for t in self.shared.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// `http://127.0.0.1:PORT` where nothing listens: connecting is refused at once.
pub fn refused_url() -> String {
    format!("http://127.0.0.1:{}", super::upstream::closed_port())
}

/// `HTTP/1.1 200 OK` with `content-length` and `body`.
pub fn ok_response(body: &str) -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

impl RawUpstream {
    pub async fn start(fault: Fault) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            fault: Mutex::new(fault),
            state: Mutex::new(State::default()),
            tasks: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let id = {
                    let mut st = accept_shared.state();
                    st.conns.push(RawConn {
                        open: true,
                        ..RawConn::default()
                    });
                    st.conns.len() - 1
                };
                let conn_shared = accept_shared.clone();
                let task = tokio::spawn(async move {
                    serve(conn_shared.clone(), id, stream).await;
                    conn_shared.state().conns[id].open = false;
                });
                accept_shared
                    .tasks
                    .lock()
                    .unwrap()
                    .push(task.abort_handle());
            }
        });
        shared.tasks.lock().unwrap().push(accept.abort_handle());
        RawUpstream { addr, shared }
    }

    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn connections(&self) -> Vec<RawConn> {
        self.shared.state().conns.clone()
    }

    pub fn connection_count(&self) -> usize {
        self.shared.state().conns.len()
    }

    /// Connections not yet closed by either side.
    pub fn open_connections(&self) -> usize {
        self.shared.state().conns.iter().filter(|c| c.open).count()
    }

    /// Every request whose head arrived, in arrival order.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.shared.state().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.state().requests.len()
    }

    /// Every byte received on every connection, connection after connection.
    pub fn received(&self) -> Vec<u8> {
        self.shared
            .state()
            .conns
            .iter()
            .flat_map(|c| c.bytes.clone())
            .collect()
    }

    /// Requests dropped by [`Fault::KeepAliveIdle`].
    pub fn late_requests(&self) -> usize {
        self.shared
            .state()
            .conns
            .iter()
            .map(|c| c.late_requests)
            .sum()
    }

    /// Body bytes written by [`Fault::Firehose`] so far.
    pub fn pushed_bytes(&self) -> u64 {
        self.shared.state().pushed
    }

    /// Connections on which a write of ours failed because the peer went away.
    pub fn write_failures(&self) -> usize {
        self.shared
            .state()
            .conns
            .iter()
            .filter(|c| c.write_failed)
            .count()
    }
}

/// Where a chunked body stands.
enum Chunked {
    Done { body: Vec<u8>, consumed: usize },
    NeedMore(Vec<u8>),
    Invalid(Vec<u8>),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn decode_chunked(buf: &[u8]) -> Chunked {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let Some(le) = find(&buf[pos..], b"\r\n") else {
            return Chunked::NeedMore(body);
        };
        let line = String::from_utf8_lossy(&buf[pos..pos + le]).into_owned();
        let size_text = line.split(';').next().unwrap_or("").trim().to_string();
        let Ok(size) = usize::from_str_radix(&size_text, 16) else {
            return Chunked::Invalid(body);
        };
        pos += le + 2;
        if size == 0 {
            loop {
                let Some(le) = find(&buf[pos..], b"\r\n") else {
                    return Chunked::NeedMore(body);
                };
                pos += le + 2;
                if le == 0 {
                    return Chunked::Done {
                        body,
                        consumed: pos,
                    };
                }
            }
        }
        if buf.len() < pos + size + 2 {
            body.extend_from_slice(&buf[pos..buf.len().min(pos + size)]);
            return Chunked::NeedMore(body);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size;
        if &buf[pos..pos + 2] != b"\r\n" {
            return Chunked::Invalid(body);
        }
        pos += 2;
    }
}

/// End of the head (after the blank line), CRLF or bare LF.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = find(buf, b"\r\n\r\n").map(|i| i + 4);
    let lf = find(buf, b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

enum Framing {
    None,
    Length(usize),
    Chunked,
}

fn framing(head: &[u8]) -> Framing {
    let text = String::from_utf8_lossy(head);
    let mut length = None;
    for line in text.split('\n').skip(1) {
        let Some((n, v)) = line.trim_end_matches('\r').split_once(':') else {
            continue;
        };
        let n = n.trim().to_ascii_lowercase();
        if n == "transfer-encoding"
            && v.rsplit(',')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
        {
            return Framing::Chunked;
        }
        if n == "content-length" && length.is_none() {
            length = v.trim().parse().ok();
        }
    }
    length.map_or(Framing::None, Framing::Length)
}

/// Reads once into `buf`, recording the bytes. False on EOF or error (peer gone).
async fn read_some(shared: &Shared, id: usize, s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = vec![0u8; 64 * 1024];
    match s.read(&mut tmp).await {
        Ok(0) | Err(_) => {
            shared.state().conns[id].peer_closed = true;
            false
        }
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            shared.state().conns[id].bytes.extend_from_slice(&tmp[..n]);
            true
        }
    }
}

async fn write(shared: &Shared, id: usize, s: &mut TcpStream, bytes: &[u8]) -> bool {
    if s.write_all(bytes).await.is_err() || s.flush().await.is_err() {
        shared.state().conns[id].write_failed = true;
        return false;
    }
    true
}

fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn serve(shared: Arc<Shared>, id: usize, mut s: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    let mut last_response: Option<Instant> = None;
    loop {
        // The head of the next request.
        let head_len = loop {
            if let Some(n) = head_end(&buf) {
                break n;
            }
            let was_empty = buf.is_empty();
            if !read_some(&shared, id, &mut s, &mut buf).await {
                return;
            }
            if was_empty {
                let fault = shared.fault.lock().unwrap().clone();
                if let (Fault::KeepAliveIdle(idle), Some(at)) = (fault, last_response) {
                    if at.elapsed() >= idle {
                        shared.state().conns[id].late_requests += 1;
                        return;
                    }
                }
            }
        };
        let head: Vec<u8> = buf.drain(..head_len).collect();
        let idx = {
            let mut st = shared.state();
            st.requests.push(RawRequest {
                conn: id,
                head: head.clone(),
                body: Vec::new(),
                complete: false,
            });
            st.requests.len() - 1
        };
        let set_body = |body: &[u8], complete: bool| {
            let mut st = shared.state();
            st.requests[idx].body = body.to_vec();
            st.requests[idx].complete = complete;
        };
        match framing(&head) {
            Framing::None => set_body(&[], true),
            Framing::Length(n) => {
                while buf.len() < n {
                    set_body(&buf, false);
                    if !read_some(&shared, id, &mut s, &mut buf).await {
                        set_body(&buf, false);
                        return;
                    }
                }
                let body: Vec<u8> = buf.drain(..n).collect();
                set_body(&body, true);
            }
            Framing::Chunked => loop {
                match decode_chunked(&buf) {
                    Chunked::Done { body, consumed } => {
                        buf.drain(..consumed);
                        set_body(&body, true);
                        break;
                    }
                    Chunked::NeedMore(partial) => {
                        set_body(&partial, false);
                        if !read_some(&shared, id, &mut s, &mut buf).await {
                            return;
                        }
                    }
                    Chunked::Invalid(partial) => {
                        set_body(&partial, false);
                        return;
                    }
                }
            },
        }

        let fault = shared.fault.lock().unwrap().clone();
        match fault {
            Fault::Respond(bytes) => {
                if !write(&shared, id, &mut s, &bytes).await {
                    return;
                }
            }
            Fault::RespondAndClose(bytes) => {
                write(&shared, id, &mut s, &bytes).await;
                let _ = s.shutdown().await;
                return;
            }
            Fault::Hold => {
                while read_some(&shared, id, &mut s, &mut buf).await {}
                return;
            }
            Fault::DelayFirstByte(d) => {
                let deadline = tokio::time::Instant::now() + d;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        alive = read_some(&shared, id, &mut s, &mut buf) => {
                            if !alive {
                                return;
                            }
                        }
                    }
                }
                if !write(&shared, id, &mut s, &ok_response("late")).await {
                    return;
                }
            }
            Fault::Drip { head, chunk, every } => {
                if !write(&shared, id, &mut s, &head).await {
                    return;
                }
                loop {
                    if !write(&shared, id, &mut s, &chunk).await {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            }
            Fault::ResetMidBody { head, body_part } => {
                let mut all = head.to_vec();
                all.extend_from_slice(&body_part);
                write(&shared, id, &mut s, &all).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                reset(s);
                return;
            }
            Fault::ResetAfterRequest => {
                reset(s);
                return;
            }
            Fault::Firehose => {
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if !write(&shared, id, &mut s, head).await {
                    return;
                }
                let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
                chunk.extend(std::iter::repeat_n(b'x', 64 * 1024));
                chunk.extend_from_slice(b"\r\n");
                loop {
                    if !write(&shared, id, &mut s, &chunk).await {
                        return;
                    }
                    shared.state().pushed += 64 * 1024;
                }
            }
            Fault::KeepAliveIdle(_) => {
                if !write(&shared, id, &mut s, &ok_response("ok")).await {
                    return;
                }
                last_response = Some(Instant::now());
            }
        }
    }
}
