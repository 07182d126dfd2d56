//! Header hygiene for both directions: hop-by-hop removal (RFC 9110 §7.6.1, including the
//! headers a `Connection` header nominates), forwarding headers, request ids.
//!
//! Nominated headers are removed *before* the proxy adds its own, and nominating a header
//! the proxy itself sets (or `host`, `content-length`) cannot remove the proxy's value.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_ROLLGATE_VERSION: HeaderName = HeaderName::from_static("x-rollgate-version");
pub static X_ROLLGATE_RETRIED_FROM: HeaderName = HeaderName::from_static("x-rollgate-retried-from");
pub static X_ROLLGATE_DEGRADED: HeaderName = HeaderName::from_static("x-rollgate-degraded");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_GATEWAY_MODEL_NAME: HeaderName = HeaderName::from_static("x-gateway-model-name");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1, plus the legacy
/// `proxy-connection` and h2c's `http2-settings`).
static HOP_BY_HOP: [&HeaderName; 10] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &HTTP2_SETTINGS,
];

/// The lengths of [`HOP_BY_HOP`]'s names, index for index.
const HOP_BY_HOP_LEN: [usize; 10] = [10, 10, 16, 18, 19, 2, 7, 17, 7, 14];

/// `name`'s index in [`HOP_BY_HOP`]. Names are told apart by length first (a table read
/// for a standard header), so most of a message's headers cost no comparison at all.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    let len = name.as_str().len();
    if !matches!(len, 2 | 7 | 10 | 14 | 16..=19) {
        return None;
    }
    (0..HOP_BY_HOP.len()).find(|&i| HOP_BY_HOP_LEN[i] == len && HOP_BY_HOP[i] == name)
}

pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_index(name).is_some()
}

/// Headers a `Connection` list may not remove: framing and the proxy's own.
fn is_protected(name: &str) -> bool {
    name.eq_ignore_ascii_case("host")
        || name.eq_ignore_ascii_case("content-length")
        || name.eq_ignore_ascii_case("x-forwarded-for")
        || name.eq_ignore_ascii_case("x-forwarded-proto")
        || name.eq_ignore_ascii_case("x-forwarded-host")
        || name.eq_ignore_ascii_case("x-request-id")
        || name.eq_ignore_ascii_case("x-rollgate-version")
}

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (enum compares for standard headers) notes which hop-by-hop
    // headers are present; only those are then removed, each removal being a hashed
    // lookup. Most requests carry none; most HTTP/1.1 responses carry `Connection` alone.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Collect nominated names first: the map cannot be mutated while borrowed.
        let mut nominated: Vec<HeaderName> = Vec::new();
        for v in headers.get_all(header::CONNECTION) {
            let Ok(s) = v.to_str() else { continue };
            for tok in s.split(',') {
                let tok = tok.trim();
                if tok.is_empty() || is_protected(tok) || is_hop_by_hop_str(tok) {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(tok.as_bytes()) {
                    nominated.push(n);
                }
            }
        }
        for n in nominated {
            headers.remove(&n);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// A `Connection` token that names a hop-by-hop header (`keep-alive` above all): removed
/// anyway, so it needs no nominated removal of its own.
fn is_hop_by_hop_str(tok: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| tok.eq_ignore_ascii_case(h.as_str()))
}

thread_local! {
    /// The last peer address formatted on this thread: a sidecar sees one peer (and a
    /// gateway few, over keep-alive connections), so the text is built once, not per request.
    static LAST_PEER: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `peer` as a header value.
fn peer_value(peer: IpAddr) -> HeaderValue {
    LAST_PEER.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((ip, v)) = last.as_ref() {
            if *ip == peer {
                return v.clone();
            }
        }
        let mut text = String::with_capacity(48);
        let _ = write!(text, "{peer}");
        let v = HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
            .unwrap_or(HeaderValue::from_static("unknown"));
        *last = Some((peer, v.clone()));
        v
    })
}

/// Whether a client-sent header name impersonates rollgate's own: `x-rollgate-*` (the
/// proxy's response headers), or the pin header, in any spelling that folds `_` into `-`
/// (as some frameworks do; Envoy's `headers_with_underscores_action`).
fn is_control(name: &HeaderName, pin: &HeaderName) -> bool {
    let (n, pin) = (name.as_str().as_bytes(), pin.as_str().as_bytes());
    let folded_eq = |a: &[u8], b: &[u8]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
    };
    (n.len() >= 11 && folded_eq(&n[..11], b"x-rollgate-")) || folded_eq(n, pin)
}

/// Cleans a client's request headers for the upstream: hop-by-hop headers (and those
/// `Connection` nominates), rollgate's own control headers in every spelling, and
/// `X-Real-IP` (rollgate does not vouch for it). One pass over the names when there is
/// nothing to remove, which is the common case.
pub fn sanitize_request(headers: &mut HeaderMap, pin: &HeaderName) {
    let mut hop = false;
    let mut other = false;
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            hop = true;
        } else if name == X_REAL_IP || is_control(name, pin) {
            other = true;
        }
    }
    if hop {
        strip_hop_by_hop(headers);
    }
    if other {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| *n == X_REAL_IP || is_control(n, pin))
            .cloned()
            .collect();
        for n in doomed {
            headers.remove(&n);
        }
    }
}

/// Appends the socket peer to `x-forwarded-for` (existing values are kept as the client
/// sent them, never trusted for decisions), appends the addressed authority to
/// `x-forwarded-host` and an element to a client's `forwarded`, and overwrites
/// `x-forwarded-proto`.
///
/// Several `x-forwarded-for` lines are one list (RFC 9110 §5.3): the upstream gets a
/// single line joining all of them in order, then the peer, as Envoy sends it.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    let ip = peer_value(peer);
    let mut prev = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(HeaderValue::as_bytes)
        .map(<[u8]>::trim_ascii)
        .filter(|v| !v.is_empty())
        .peekable();
    let value = if prev.peek().is_none() {
        ip
    } else {
        // Bytes, not text: a value hyper accepted is forwarded as it came.
        let mut list = Vec::with_capacity(64);
        for v in prev {
            list.extend_from_slice(v);
            list.extend_from_slice(b", ");
        }
        list.extend_from_slice(ip.as_bytes());
        HeaderValue::from_maybe_shared(bytes::Bytes::from(list)).unwrap_or(ip)
    };
    headers.insert(X_FORWARDED_FOR.clone(), value);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(h) = host {
        // Appended like X-Forwarded-For: the last element is the authority this hop saw.
        headers.append(X_FORWARDED_HOST.clone(), h);
    }
    // RFC 7239: a proxy that forwards a `Forwarded` header appends its own element.
    if headers.contains_key(&FORWARDED) {
        let ip = peer_value(peer);
        let ip = ip.to_str().unwrap_or_default();
        let element = if peer.is_ipv6() {
            format!("for=\"[{ip}]\";proto={proto}")
        } else {
            format!("for={ip};proto={proto}")
        };
        if let Ok(v) = HeaderValue::from_str(&element) {
            headers.append(FORWARDED.clone(), v);
        }
    }
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);
static PROCESS_TAG: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// A new request id: 8 hex chars of per-process randomness, then a sequence number.
/// Unique within a process and very likely across replicas; cheap (no syscall).
pub fn new_request_id() -> HeaderValue {
    let tag = *PROCESS_TAG.get_or_init(|| fastrand::u32(..));
    let seq = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 25];
    hex(&mut id[..8], u64::from(tag));
    id[8] = b'-';
    hex(&mut id[9..], seq);
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("0"))
}

/// Writes the low `out.len()` hex digits of `n` (lower case, zero-padded) into `out`.
fn hex(out: &mut [u8], mut n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// Returns the request id to use: the client's if it is sane, else a new one.
///
/// Marked sensitive, which HTTP/2 sends as a literal never indexed (HPACK, RFC 7541
/// 6.2.3): a value that differs on every request gains nothing from the compression
/// table. Indexed, each one took a new entry, and since the encoder keeps entries of one
/// name in a chain, every later response walked the chain of old ids before adding its
/// own (about 4k of 53k instructions per proxied h2 request, `index_occupied`). The same
/// value goes to the upstream (and any shadow), so an HTTP/2 upstream connection is spared
/// the same walk. HTTP/1.1 ignores the mark.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut id = match headers.get(&X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 128 => v.clone(),
        _ => new_request_id(),
    };
    id.set_sensitive(true);
    id
}

/// Finds cookie `name` in the `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    for v in headers.get_all(header::COOKIE) {
        let Ok(s) = v.to_str() else { continue };
        for pair in s.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == name {
                    return Some(v);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn hop_by_hop_names_are_found_by_length_then_name() {
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(HOP_BY_HOP_LEN[i], h.as_str().len(), "{h}");
            assert_eq!(hop_by_hop_index(h), Some(i), "{h}");
            let upper = HeaderName::from_bytes(h.as_str().to_ascii_uppercase().as_bytes());
            assert_eq!(upper.ok().and_then(|n| hop_by_hop_index(&n)), Some(i));
        }
        for other in [
            "content-length",
            "x-request-id",
            "te2",
            "trailers",
            "connectio",
            "upgrade-insecure-requests",
        ] {
            let n = HeaderName::from_static(other);
            assert!(!is_hop_by_hop(&n), "{other}");
        }
        // Same length as a hop-by-hop name, different name.
        for same_len in [
            "x-",
            "accept-",
            "x-trailer-",
            "content-length",
            "proxy-connectio",
        ] {
            let n = HeaderName::from_bytes(same_len.as_bytes()).unwrap();
            assert!(!is_hop_by_hop(&n), "{same_len}");
        }
    }

    use super::*;

    #[test]
    fn strips_nominated_and_standard_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret, Host, content-length"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::TE).is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get(header::HOST).is_some());
        assert!(h.get(header::CONTENT_LENGTH).is_some());
        assert!(h.get("x-keep").is_some());
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped_and_nothing_else() {
        for hop in HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.append(hop, HeaderValue::from_static("x"));
            h.append(hop, HeaderValue::from_static("y"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert!(h.get(hop).is_none(), "{hop} kept");
            assert_eq!(h.len(), 2, "{hop}: {h:?}");
        }
    }

    #[test]
    fn forwarded_for_appends_peer() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.1.1"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), "http", None);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.1.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
    }

    #[test]
    fn every_forwarded_for_line_is_kept_in_order() {
        let mut h = HeaderMap::new();
        for v in ["10.1.1.1", "10.2.2.2, 10.3.3.3", " ", "10.4.4.4"] {
            h.append(&X_FORWARDED_FOR, HeaderValue::from_static(v));
        }
        add_forwarded(&mut h, "127.0.0.2".parse().unwrap(), "http", None);
        let all: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(
            all,
            ["10.1.1.1, 10.2.2.2, 10.3.3.3, 10.4.4.4, 127.0.0.2"],
            "one line, every client entry in order, then the peer"
        );
    }

    #[test]
    fn request_ids_are_unique_and_well_formed() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        let a = a.to_str().unwrap();
        assert_eq!(a.len(), 25);
        assert_eq!(&a[8..9], "-");
        assert!(a.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        let mut digits = [0u8; 6];
        hex(&mut digits, 0xabc);
        assert_eq!(&digits, b"000abc");
    }

    #[test]
    fn request_ids_are_marked_never_to_index() {
        let mut h = HeaderMap::new();
        assert!(request_id(&h).is_sensitive(), "a new id");
        h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("abc"));
        let id = request_id(&h);
        assert_eq!(id, "abc");
        assert!(id.is_sensitive(), "the client's id");
    }

    #[test]
    fn forwarded_for_of_a_new_peer_is_not_the_cached_one() {
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "10.0.0.1".parse().unwrap(), "http", None);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
        add_forwarded(&mut h, "::1".parse().unwrap(), "http", None);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, ::1");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::1".parse().unwrap(), "http", None);
        assert_eq!(h[&X_FORWARDED_FOR], "::1");
    }

    #[test]
    fn control_headers_in_any_spelling_are_removed() {
        let pin = HeaderName::from_static("x-rollgate-version");
        let mut h = HeaderMap::new();
        for n in [
            "x_rollgate_version",
            "x-rollgate_version",
            "x-rollgate-degraded",
            "x_rollgate-retried-from",
            "x-real-ip",
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        h.insert("x-rollgate", HeaderValue::from_static("kept"));
        h.insert("x-user-id", HeaderValue::from_static("kept"));
        sanitize_request(&mut h, &pin);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-rollgate", "x-user-id"]);
        let custom = HeaderName::from_static("x-model-pin");
        let mut h = HeaderMap::new();
        h.insert("x_model_pin", HeaderValue::from_static("v2"));
        sanitize_request(&mut h, &custom);
        assert!(h.is_empty());
    }

    #[test]
    fn cookie_lookup() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; uid=abc; b=2"),
        );
        assert_eq!(cookie(&h, "uid"), Some("abc"));
        assert_eq!(cookie(&h, "zz"), None);
    }
}
