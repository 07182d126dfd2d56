//! `H2Conn`: HTTP/2 written by hand, frame by frame, for the attacks a well-behaved client
//! library refuses to send (rapid reset, CONTINUATION floods, zero WINDOW_UPDATEs, DATA after
//! END_STREAM, connection-specific or uppercase header names, CRLF in values...).
//!
//! Writing: [`frame`] and the helpers below build frames byte by byte; header blocks are
//! HPACK "literal without indexing, new name" fields with no Huffman coding ([`literal`],
//! [`block`], [`request_block`]), so any bytes at all can go into a name or a value.
//!
//! Reading: a background task parses the frames coming back (re-assembling HEADERS +
//! CONTINUATION and decoding them with a full HPACK decoder, Huffman and dynamic table
//! included, since servers compress) and reports them as [`Event`]s: GOAWAY codes and debug
//! data, RST_STREAM codes, response headers, DATA. It acknowledges the server's SETTINGS and
//! PINGs so graceful shutdown (GOAWAY, PING, GOAWAY) can complete. A connection can also be
//! opened with nobody reading ([`H2Conn::connect_unread`]) to see whether the server applies
//! backpressure.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const STREAM_CLOSED: u32 = 0x5;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

/// The largest frame payload a peer must accept before SETTINGS say otherwise.
pub const DEFAULT_MAX_FRAME: usize = 16_384;

/// A readable name for an error code.
pub fn code_name(code: u32) -> &'static str {
    match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------
// Writing frames.
// ---------------------------------------------------------------------------------------

/// One frame: 24-bit length, type, flags, 31-bit stream id, payload.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 1 << 24, "frame payload too long");
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS carrying (a first fragment of) `block`.
pub fn headers(stream: u32, block: &[u8], end_stream: bool, end_headers: bool) -> Vec<u8> {
    let mut flags = 0;
    if end_stream {
        flags |= END_STREAM;
    }
    if end_headers {
        flags |= END_HEADERS;
    }
    frame(HEADERS, flags, stream, block)
}

pub fn continuation(stream: u32, fragment: &[u8], end_headers: bool) -> Vec<u8> {
    frame(
        CONTINUATION,
        if end_headers { END_HEADERS } else { 0 },
        stream,
        fragment,
    )
}

/// A whole header block: HEADERS plus as many CONTINUATIONs as `max_frame` requires.
pub fn header_frames(stream: u32, block: &[u8], end_stream: bool, max_frame: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut parts = block.chunks(max_frame).peekable();
    let first = parts.next().unwrap_or(&[]);
    out.extend(headers(stream, first, end_stream, parts.peek().is_none()));
    while let Some(p) = parts.next() {
        out.extend(continuation(stream, p, parts.peek().is_none()));
    }
    out
}

pub fn data(stream: u32, bytes: &[u8], end_stream: bool) -> Vec<u8> {
    frame(DATA, if end_stream { END_STREAM } else { 0 }, stream, bytes)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn ping(payload: [u8; 8], ack: bool) -> Vec<u8> {
    frame(PING, if ack { ACK } else { 0 }, 0, &payload)
}

pub fn settings(values: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::with_capacity(values.len() * 6);
    for (id, v) in values {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

pub fn settings_ack() -> Vec<u8> {
    frame(SETTINGS, ACK, 0, &[])
}

pub fn goaway(last_stream: u32, code: u32) -> Vec<u8> {
    let mut p = last_stream.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    frame(GOAWAY, 0, 0, &p)
}

// ---------------------------------------------------------------------------------------
// HPACK, encoding side: literals only.
// ---------------------------------------------------------------------------------------

/// An HPACK integer with an `n`-bit prefix; `first` holds the bits above the prefix.
fn hpack_int(first: u8, n: u8, mut value: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A raw (non-Huffman) HPACK string.
fn hpack_str(s: &[u8], out: &mut Vec<u8>) {
    hpack_int(0x00, 7, s.len(), out);
    out.extend_from_slice(s);
}

/// One header field as "literal without indexing, new name", no Huffman: the bytes go on
/// the wire exactly as given (uppercase, CR, LF, NUL and all).
pub fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    hpack_str(name, &mut out);
    hpack_str(value, &mut out);
    out
}

/// A header block of literal fields, in order.
pub fn block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    fields.iter().flat_map(|(n, v)| literal(n, v)).collect()
}

/// `:method`, `:scheme: http`, `:path`, `:authority` (omitted when `None`), then `extra`.
pub fn request_block(
    method: &str,
    path: &str,
    authority: Option<&str>,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = literal(b":method", method.as_bytes());
    out.extend(literal(b":scheme", b"http"));
    out.extend(literal(b":path", path.as_bytes()));
    if let Some(a) = authority {
        out.extend(literal(b":authority", a.as_bytes()));
    }
    for (n, v) in extra {
        out.extend(literal(n.as_bytes(), v.as_bytes()));
    }
    out
}

// ---------------------------------------------------------------------------------------
// HPACK, decoding side (RFC 7541): static + dynamic table, Huffman.
// ---------------------------------------------------------------------------------------

const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

// RFC 7541 Appendix B, symbols 0..=255 (EOS, 30 one-bits, only ever appears as padding).
const HUFFMAN_CODES: [u32; 256] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8,
    0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed,
    0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4,
    0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8,
    0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb,
    0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4,
    0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb,
    0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda,
    0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd,
    0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0,
    0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7,
    0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7,
    0x7ffffe2, 0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4,
    0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb,
    0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb,
    0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
];

const HUFFMAN_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
];

/// (code length, code) -> symbol.
fn huffman_map() -> &'static std::collections::HashMap<(u8, u32), u8> {
    static MAP: OnceLock<std::collections::HashMap<(u8, u32), u8>> = OnceLock::new();
    MAP.get_or_init(|| {
        (0..256)
            .map(|s| ((HUFFMAN_LENGTHS[s], HUFFMAN_CODES[s]), s as u8))
            .collect()
    })
}

fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, String> {
    let map = huffman_map();
    let mut out = Vec::new();
    let (mut code, mut len) = (0u32, 0u8);
    for byte in src {
        for i in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> i) & 1);
            len += 1;
            if len > 30 {
                return Err("huffman: code longer than 30 bits".into());
            }
            if len >= 5 {
                if let Some(&s) = map.get(&(len, code)) {
                    out.push(s);
                    code = 0;
                    len = 0;
                }
            }
        }
    }
    // Padding: fewer than 8 bits, all ones.
    if len >= 8 || code != (1u32 << len) - 1 {
        return Err("huffman: bad padding".into());
    }
    Ok(out)
}

/// HPACK decoding state of one connection (the dynamic table).
#[derive(Debug)]
pub struct Decoder {
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// Names of the fields the last block added to the dynamic table.
    indexed: Vec<String>,
    /// Names of the fields the last block sent as literals never indexed.
    never_indexed: Vec<String>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: 4096,
            indexed: Vec::new(),
            never_indexed: Vec::new(),
        }
    }
}

impl Decoder {
    fn int(src: &[u8], pos: &mut usize, n: u8) -> Result<usize, String> {
        let max = (1usize << n) - 1;
        let first = *src.get(*pos).ok_or("hpack: truncated integer")? as usize & max;
        *pos += 1;
        if first < max {
            return Ok(first);
        }
        let mut value = max;
        let mut shift = 0;
        loop {
            let b = *src.get(*pos).ok_or("hpack: truncated integer")?;
            *pos += 1;
            value += ((b & 0x7f) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            if shift > 28 {
                return Err("hpack: integer overflow".into());
            }
        }
    }

    fn string(src: &[u8], pos: &mut usize) -> Result<Vec<u8>, String> {
        let huffman = src.get(*pos).ok_or("hpack: truncated string")? & 0x80 != 0;
        let len = Self::int(src, pos, 7)?;
        let raw = src.get(*pos..*pos + len).ok_or("hpack: truncated string")?;
        *pos += len;
        if huffman {
            huffman_decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }

    fn get(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), String> {
        if index == 0 {
            return Err("hpack: index 0".into());
        }
        if index <= STATIC_TABLE.len() {
            let (n, v) = STATIC_TABLE[index - 1];
            return Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        self.table
            .get(index - STATIC_TABLE.len() - 1)
            .cloned()
            .ok_or_else(|| format!("hpack: index {index} out of range"))
    }

    fn evict(&mut self) {
        while self.size > self.max_size {
            if let Some((n, v)) = self.table.pop_back() {
                self.size -= n.len() + v.len() + 32;
            } else {
                break;
            }
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        self.size += name.len() + value.len() + 32;
        self.table.push_front((name, value));
        self.evict();
    }

    /// Decodes a complete header block.
    pub fn decode(&mut self, src: &[u8]) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        let mut pos = 0;
        self.indexed.clear();
        self.never_indexed.clear();
        while pos < src.len() {
            let b = src[pos];
            let (name, value) = if b & 0x80 != 0 {
                let i = Self::int(src, &mut pos, 7)?;
                self.get(i)?
            } else if b & 0xc0 == 0x40 {
                let i = Self::int(src, &mut pos, 6)?;
                let name = if i == 0 {
                    Self::string(src, &mut pos)?
                } else {
                    self.get(i)?.0
                };
                let value = Self::string(src, &mut pos)?;
                self.indexed
                    .push(String::from_utf8_lossy(&name).into_owned());
                self.insert(name.clone(), value.clone());
                (name, value)
            } else if b & 0xe0 == 0x20 {
                self.max_size = Self::int(src, &mut pos, 5)?;
                self.evict();
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let never = b & 0xf0 == 0x10;
                let i = Self::int(src, &mut pos, 4)?;
                let name = if i == 0 {
                    Self::string(src, &mut pos)?
                } else {
                    self.get(i)?.0
                };
                if never {
                    self.never_indexed
                        .push(String::from_utf8_lossy(&name).into_owned());
                }
                (name, Self::string(src, &mut pos)?)
            };
            out.push((
                String::from_utf8_lossy(&name).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Reading frames.
// ---------------------------------------------------------------------------------------

/// A frame (or the end of the connection) as seen by the client.
#[derive(Debug, Clone)]
pub enum Event {
    Settings {
        ack: bool,
        values: Vec<(u16, u32)>,
    },
    /// A complete header block (HEADERS plus CONTINUATIONs), decoded.
    Headers {
        stream: u32,
        fields: Vec<(String, String)>,
        end_stream: bool,
        /// Names of the fields sent "with incremental indexing" (added to the table).
        indexed: Vec<String>,
        /// Names of the fields sent as literals "never indexed" (RFC 7541 6.2.3).
        never_indexed: Vec<String>,
    },
    Data {
        stream: u32,
        bytes: Vec<u8>,
        end_stream: bool,
    },
    RstStream {
        stream: u32,
        code: u32,
    },
    GoAway {
        last_stream: u32,
        code: u32,
        debug: String,
    },
    Ping {
        ack: bool,
        payload: [u8; 8],
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Other {
        ty: u8,
        flags: u8,
        stream: u32,
    },
    /// The server closed the connection (EOF, reset, or a frame we could not parse).
    Closed(String),
}

/// What became of one stream.
#[derive(Debug, Clone, Default)]
pub struct StreamOutcome {
    /// `:status` of the first HEADERS on the stream.
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server ended the stream cleanly (END_STREAM).
    pub end_stream: bool,
    /// RST_STREAM code, if the server reset the stream.
    pub reset: Option<u32>,
    /// GOAWAY code and debug data, if the connection went away first.
    pub goaway: Option<(u32, String)>,
    /// The connection closed.
    pub closed: bool,
}

impl StreamOutcome {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response head as [`get_heads`] saw it.
#[derive(Debug)]
pub struct Head {
    pub fields: Vec<(String, String)>,
    /// Names of the fields the server added to its HPACK table.
    pub indexed: Vec<String>,
    /// Names of the fields the server sent as literals never indexed.
    pub never_indexed: Vec<String>,
}

impl Head {
    /// Every value of `name`, in order.
    pub fn values(&self, name: &str) -> Vec<String> {
        let named = self.fields.iter().filter(|(n, _)| n == name);
        named.map(|(_, v)| v.clone()).collect()
    }

    /// Every `name` field was sent never indexed, and none went into the table.
    pub fn never_indexed(&self, name: &str) -> bool {
        let sent = self.never_indexed.iter().filter(|n| *n == name).count();
        sent == self.values(name).len() && !self.indexed.iter().any(|n| n == name)
    }
}

/// GETs of `/v1/chat` (authority `a`), one per entry of `requests` with that entry's extra
/// fields, sent one at a time on one connection opened with SETTINGS `settings`: the
/// response head of each. Panics when one does not come within 5 s.
pub async fn get_heads(
    addr: SocketAddr,
    settings: &[(u16, u32)],
    requests: &[Vec<(&str, &str)>],
) -> Vec<Head> {
    let mut h2 = H2Conn::connect_with(addr, settings).await;
    h2.start_reader();
    let mut out = Vec::new();
    for (i, extra) in requests.iter().enumerate() {
        let stream = 2 * i as u32 + 1;
        let block = request_block("GET", "/v1/chat", Some("a"), extra);
        h2.send(&headers(stream, &block, true, true))
            .await
            .expect("send HEADERS");
        let head = h2
            .wait_for(
                Duration::from_secs(5),
                |e| matches!(e, Event::Headers { stream: s, .. } if *s == stream),
            )
            .await;
        let Some(Event::Headers {
            fields,
            indexed,
            never_indexed,
            ..
        }) = head
        else {
            panic!(
                "request {i} {extra:?} (settings {settings:?}): no response head: {:?}",
                h2.seen().iter().rev().take(3).collect::<Vec<_>>()
            );
        };
        out.push(Head {
            fields,
            indexed,
            never_indexed,
        });
    }
    out
}

pub struct H2Conn {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    reader: Option<OwnedReadHalf>,
    events: Option<mpsc::UnboundedReceiver<Event>>,
    seen: Vec<Event>,
    auto_ack: bool,
}

impl H2Conn {
    /// Connects, sends the client preface and an empty SETTINGS, and starts reading.
    pub async fn connect(addr: SocketAddr) -> H2Conn {
        let mut c = Self::connect_with(addr, &[]).await;
        c.start_reader();
        c
    }

    /// Connects and sends the preface and SETTINGS `values`; nobody reads until
    /// [`H2Conn::start_reader`], so the server's writes back up.
    pub async fn connect_unread(addr: SocketAddr) -> H2Conn {
        Self::connect_with(addr, &[]).await
    }

    pub async fn connect_with(addr: SocketAddr, values: &[(u16, u32)]) -> H2Conn {
        let s = TcpStream::connect(addr).await.expect("connect (h2)");
        let _ = s.set_nodelay(true);
        let (r, w) = s.into_split();
        let c = H2Conn {
            writer: Arc::new(Mutex::new(w)),
            reader: Some(r),
            events: None,
            seen: Vec::new(),
            auto_ack: true,
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(values));
        c.send(&hello).await.expect("send preface");
        c
    }

    /// Whether the reader acknowledges the server's SETTINGS and PINGs (default: yes).
    pub fn set_auto_ack(&mut self, on: bool) {
        self.auto_ack = on;
    }

    /// Starts the background reader (once).
    pub fn start_reader(&mut self) {
        let Some(r) = self.reader.take() else { return };
        let (tx, rx) = mpsc::unbounded_channel();
        self.events = Some(rx);
        tokio::spawn(read_loop(r, self.writer.clone(), tx, self.auto_ack));
    }

    /// Writes `bytes` as they are.
    pub async fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        w.write_all(bytes).await?;
        w.flush().await
    }

    /// Half-closes the write side.
    pub async fn shutdown_write(&self) {
        let _ = self.writer.lock().await.shutdown().await;
    }

    /// The next event within `timeout` (None on timeout, or after the connection closed and
    /// every event was taken).
    pub async fn next(&mut self, timeout: Duration) -> Option<Event> {
        let rx = self.events.as_mut().expect("start_reader first");
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(e)) => {
                self.seen.push(e.clone());
                Some(e)
            }
            _ => None,
        }
    }

    /// Events until one matches `pred` (returned), or `timeout` passes, or the connection
    /// closed (None).
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let e = self.next(left).await?;
            if pred(&e) {
                return Some(e);
            }
            if matches!(e, Event::Closed(_)) {
                return None;
            }
        }
    }

    /// The server's GOAWAY (code, debug data), if one arrives within `timeout`.
    pub async fn goaway(&mut self, timeout: Duration) -> Option<(u32, String)> {
        if let Some(g) = self.seen_goaway() {
            return Some(g);
        }
        match self
            .wait_for(timeout, |e| matches!(e, Event::GoAway { .. }))
            .await
        {
            Some(Event::GoAway { code, debug, .. }) => Some((code, debug)),
            _ => None,
        }
    }

    /// The first GOAWAY seen so far.
    pub fn seen_goaway(&self) -> Option<(u32, String)> {
        self.seen.iter().find_map(|e| match e {
            Event::GoAway { code, debug, .. } => Some((*code, debug.clone())),
            _ => None,
        })
    }

    /// Whether the connection was seen to close.
    pub fn seen_closed(&self) -> bool {
        self.seen.iter().any(|e| matches!(e, Event::Closed(_)))
    }

    /// Every event seen so far.
    pub fn seen(&self) -> &[Event] {
        &self.seen
    }

    /// Waits until the connection closes (true) or `timeout` passes (false).
    pub async fn closed(&mut self, timeout: Duration) -> bool {
        if self.seen_closed() {
            return true;
        }
        self.wait_for(timeout, |e| matches!(e, Event::Closed(_)))
            .await;
        self.seen_closed()
    }

    /// Sends a PING and waits for its ACK: every frame written before has been processed.
    pub async fn sync(&mut self, timeout: Duration) -> bool {
        let payload = *b"rg-sync!";
        if self.send(&ping(payload, false)).await.is_err() {
            return false;
        }
        self.wait_for(
            timeout,
            |e| matches!(e, Event::Ping { ack: true, payload: p } if *p == payload),
        )
        .await
        .is_some()
    }

    /// Collects what happens to `stream` until it ends, is reset, the connection goes away,
    /// or `timeout` passes. Events seen earlier for the stream count too.
    pub async fn outcome(&mut self, stream: u32, timeout: Duration) -> StreamOutcome {
        let mut out = StreamOutcome::default();
        let earlier: Vec<Event> = self.seen.clone();
        for e in &earlier {
            if apply(&mut out, stream, e) {
                return out;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return out;
            }
            let Some(e) = self.next(left).await else {
                return out;
            };
            if apply(&mut out, stream, &e) {
                return out;
            }
        }
    }
}

/// Folds `e` into `out`; true when the stream's fate is settled.
fn apply(out: &mut StreamOutcome, stream: u32, e: &Event) -> bool {
    match e {
        Event::Headers {
            stream: s,
            fields,
            end_stream,
            ..
        } if *s == stream => {
            if out.status.is_none() {
                out.status = fields
                    .iter()
                    .find(|(n, _)| n == ":status")
                    .and_then(|(_, v)| v.parse().ok());
            }
            out.headers.extend(fields.iter().cloned());
            out.end_stream |= *end_stream;
            *end_stream
        }
        Event::Data {
            stream: s,
            bytes,
            end_stream,
        } if *s == stream => {
            out.body.extend_from_slice(bytes);
            out.end_stream |= *end_stream;
            *end_stream
        }
        Event::RstStream { stream: s, code } if *s == stream => {
            out.reset = Some(*code);
            true
        }
        Event::GoAway {
            last_stream,
            code,
            debug,
        } => {
            out.goaway = Some((*code, debug.clone()));
            // A stream the server never processed is over; a processed one may still finish
            // (graceful shutdown).
            stream > *last_stream
        }
        Event::Closed(_) => {
            out.closed = true;
            true
        }
        _ => false,
    }
}

async fn read_loop(
    mut r: OwnedReadHalf,
    writer: Arc<Mutex<OwnedWriteHalf>>,
    tx: mpsc::UnboundedSender<Event>,
    auto_ack: bool,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    let mut decoder = Decoder::default();
    // HEADERS waiting for their CONTINUATIONs: (stream, end_stream, fragment so far).
    let mut partial: Option<(u32, bool, Vec<u8>)> = None;
    let ack = |bytes: Vec<u8>| {
        let w = writer.clone();
        // Never block the reader on the writer: a test may be in the middle of a flood.
        tokio::spawn(async move {
            let mut w = w.lock().await;
            let _ = w.write_all(&bytes).await;
        });
    };
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let ty = buf[3];
            let flags = buf[4];
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            let ev = match ty {
                DATA => {
                    let body = strip_padding(flags, &payload).to_vec();
                    Event::Data {
                        stream,
                        bytes: body,
                        end_stream: flags & END_STREAM != 0,
                    }
                }
                HEADERS | CONTINUATION => {
                    let fragment = if ty == HEADERS {
                        let mut p = strip_padding(flags, &payload);
                        if flags & PRIORITY != 0 && p.len() >= 5 {
                            p = &p[5..];
                        }
                        partial = Some((stream, flags & END_STREAM != 0, p.to_vec()));
                        None
                    } else {
                        Some(payload.clone())
                    };
                    if let (Some(f), Some((_, _, so_far))) = (fragment, partial.as_mut()) {
                        so_far.extend(f);
                    }
                    if flags & END_HEADERS == 0 {
                        continue;
                    }
                    let Some((s, end_stream, block)) = partial.take() else {
                        continue;
                    };
                    match decoder.decode(&block) {
                        Ok(fields) => Event::Headers {
                            stream: s,
                            fields,
                            end_stream,
                            indexed: std::mem::take(&mut decoder.indexed),
                            never_indexed: std::mem::take(&mut decoder.never_indexed),
                        },
                        Err(e) => {
                            let _ = tx.send(Event::Closed(format!("undecodable headers: {e}")));
                            return;
                        }
                    }
                }
                RST_STREAM if payload.len() >= 4 => Event::RstStream {
                    stream,
                    code: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                },
                SETTINGS => {
                    let is_ack = flags & ACK != 0;
                    if !is_ack && auto_ack {
                        ack(settings_ack());
                    }
                    Event::Settings {
                        ack: is_ack,
                        values: payload
                            .chunks_exact(6)
                            .map(|c| {
                                (
                                    u16::from_be_bytes([c[0], c[1]]),
                                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                                )
                            })
                            .collect(),
                    }
                }
                PING if payload.len() == 8 => {
                    let mut p = [0u8; 8];
                    p.copy_from_slice(&payload);
                    let is_ack = flags & ACK != 0;
                    if !is_ack && auto_ack {
                        ack(ping(p, true));
                    }
                    Event::Ping {
                        ack: is_ack,
                        payload: p,
                    }
                }
                GOAWAY if payload.len() >= 8 => Event::GoAway {
                    last_stream: u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]) & 0x7fff_ffff,
                    code: u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]),
                    debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
                },
                WINDOW_UPDATE if payload.len() >= 4 => Event::WindowUpdate {
                    stream,
                    increment: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff,
                },
                _ => Event::Other { ty, flags, stream },
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
        match r.read(&mut tmp).await {
            Ok(0) => {
                let _ = tx.send(Event::Closed("EOF".into()));
                return;
            }
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) => {
                let _ = tx.send(Event::Closed(format!("read error: {e}")));
                return;
            }
        }
    }
}

fn strip_padding(flags: u8, payload: &[u8]) -> &[u8] {
    if flags & PADDED == 0 || payload.is_empty() {
        return payload;
    }
    let pad = usize::from(payload[0]);
    if 1 + pad > payload.len() {
        return &[];
    }
    &payload[1..payload.len() - pad]
}
