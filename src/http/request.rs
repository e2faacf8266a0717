//! Parsing a request head, strictly and within fixed limits.

use std::net::SocketAddr;

/// Longest request head accepted (request line plus headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Put,
    Delete,
    Other,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// The method as sent, for logs.
    pub method_text: String,
    /// The request target as sent (path and query).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub keep_alive: bool,
    pub content_length: u64,
    pub chunked: bool,
    pub expect_continue: bool,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// What a buffer holds so far.
#[derive(Debug)]
pub enum Parsed {
    /// A whole head, `usize` bytes long.
    Complete(Request, usize),
    Partial,
    /// A status to answer with before closing, and why (for the log).
    Invalid(u16, String),
}

/// Longest request target accepted: a longer one is answered 414, as nginx does past its 8 KiB
/// header buffers. No path Nix asks for is over 200 bytes.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Parses a request head by RFC 9112, refusing what a lenient parser would guess at:
/// - line ends must be CRLF (a bare LF is how request smuggling through proxies that disagree
///   on line ends starts): 400;
/// - `Content-Length` is digits only (`+5`, `-1`, `5 x` are refused, as are two different
///   values): 400;
/// - an HTTP/1.1 request must carry exactly one `Host`: 400;
/// - a target over [`MAX_TARGET_BYTES`] is 414 (431 is for the headers);
/// - an absolute-form target (`GET http://host/x.narinfo`, what a client configured with ncps
///   as its proxy sends) is taken as its path and query;
/// - a `Transfer-Encoding` other than exactly `chunked` is 501; with `Content-Length` as well,
///   400 (RFC 9112 6.3 lets a server refuse that, and it always closes after).
pub fn parse_head(buf: &[u8], peer: SocketAddr) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if request_line_too_long(buf) => {
            return Parsed::Invalid(414, format!("request target longer than {MAX_TARGET_BYTES} bytes"))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Parsed::Invalid(431, "request head too large".into())
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(431, "too many headers".into())
        }
        Err(e) => return Parsed::Invalid(400, format!("malformed request: {e}")),
    };
    if let Some(why) = bare_lf(&buf[..n]) {
        return Parsed::Invalid(400, why.into());
    }
    let (Some(method_text), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid(400, "incomplete request line".into());
    };
    if target.len() > MAX_TARGET_BYTES {
        return Parsed::Invalid(414, format!("request target longer than {MAX_TARGET_BYTES} bytes"));
    }
    if n > MAX_HEAD_BYTES {
        return Parsed::Invalid(431, "request head too large".into());
    }
    let Some(target) = origin_form(target) else {
        return Parsed::Invalid(400, "request target is neither a path nor an http(s) URL".into());
    };
    let method = match method_text {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        _ => Method::Other,
    };
    let mut out_headers = Vec::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut hosts = 0;
    let mut connection = String::new();
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Parsed::Invalid(400, format!("header {} is not UTF-8", h.name));
        };
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let Some(len) = content_length_value(value) else {
                return Parsed::Invalid(400, format!("bad Content-Length {value:?}"));
            };
            // Two different lengths is the classic request-smuggling trick; refuse it.
            if content_length.is_some_and(|l| l != len) {
                return Parsed::Invalid(400, "conflicting Content-Length headers".into());
            }
            content_length = Some(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked`, alone and once: any other coding (gzip, chunked twice, an
            // unknown name) would have to be decoded, and guessing is how smuggling works.
            if chunked || !value.eq_ignore_ascii_case("chunked") {
                return Parsed::Invalid(501, format!("unsupported Transfer-Encoding {value:?}"));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection = value.to_ascii_lowercase();
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
        out_headers.push((h.name.to_string(), value.to_string()));
    }
    if chunked && content_length.is_some() {
        return Parsed::Invalid(400, "both Transfer-Encoding and Content-Length".into());
    }
    if chunked && minor == 0 {
        // RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding is faulty.
        return Parsed::Invalid(400, "Transfer-Encoding in an HTTP/1.0 request".into());
    }
    if hosts > 1 || (minor == 1 && hosts == 0) {
        let why = if hosts > 1 { "more than one Host header" } else { "HTTP/1.1 request without Host" };
        return Parsed::Invalid(400, why.into());
    }
    let keep_alive = match minor {
        1 => !connection.contains("close"),
        _ => connection.contains("keep-alive"),
    };
    Parsed::Complete(
        Request {
            method,
            method_text: method_text.to_string(),
            target,
            headers: out_headers,
            keep_alive,
            content_length: content_length.unwrap_or(0),
            chunked,
            expect_continue,
            peer,
        },
        n,
    )
}

/// A Content-Length value: one or more digits and nothing else (RFC 9110 8.6), within u64.
fn content_length_value(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Why a complete head is refused for its line ends: a LF not after a CR.
fn bare_lf(head: &[u8]) -> Option<&'static str> {
    let mut prev = 0u8;
    for &b in head {
        if b == b'\n' && prev != b'\r' {
            return Some("bare LF line end (CRLF required)");
        }
        prev = b;
    }
    None
}

/// Whether an unfinished head's first line is already longer than any accepted target allows.
fn request_line_too_long(buf: &[u8]) -> bool {
    // Method, spaces and "HTTP/1.1" take under 32 bytes.
    let line = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    line > MAX_TARGET_BYTES + 32
}

/// The target in origin form (path and query): as sent when it is one; the path of an
/// absolute-form `http(s)://authority/path` (RFC 9112 3.2.2: a server must accept it);
/// `*` (asterisk form) as is. `None` for anything else.
fn origin_form(target: &str) -> Option<String> {
    if target.starts_with('/') || target == "*" {
        return Some(target.to_string());
    }
    let scheme_end = target.find("://")?;
    let scheme = &target[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let path_at = rest.find(['/', '?']).unwrap_or(rest.len());
    if path_at == 0 {
        return None; // no authority
    }
    let path = &rest[path_at..];
    Some(if path.starts_with('/') { path.to_string() } else { format!("/{path}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[test]
    fn a_plain_get_is_complete_and_keeps_alive() {
        let Parsed::Complete(r, n) = parse_head(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\nrest", peer()) else {
            panic!()
        };
        assert_eq!((r.method, r.target.as_str(), r.keep_alive, n), (Method::Get, "/nix-cache-info", true, 41));
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_are_refused() {
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHost:", peer()), Parsed::Partial));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 10, b'a');
        assert!(matches!(parse_head(&big, peer()), Parsed::Invalid(431, _)));
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let two = b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(matches!(parse_head(two, peer()), Parsed::Invalid(400, _)));
        let both = b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_head(both, peer()), Parsed::Invalid(400, _)));
        assert!(matches!(parse_head(b"GET\x00 / HTTP/1.1\r\n\r\n", peer()), Parsed::Invalid(400, _)));
    }

    #[test]
    fn http10_closes_unless_asked_to_keep_alive() {
        let Parsed::Complete(r, _) = parse_head(b"GET / HTTP/1.0\r\n\r\n", peer()) else { panic!() };
        assert!(!r.keep_alive);
        let Parsed::Complete(r, _) = parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", peer()) else {
            panic!()
        };
        assert!(r.keep_alive);
    }

    fn status_of(head: &[u8]) -> u16 {
        match parse_head(head, peer()) {
            Parsed::Complete(..) => 200,
            Parsed::Partial => 0,
            Parsed::Invalid(status, _) => status,
        }
    }

    #[test]
    fn content_length_must_be_digits_only() {
        for bad in ["+5", "-1", " 5 x", "5 x", "0x5", "5,5", "", "99999999999999999999999"] {
            let head = format!("PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(status_of(head.as_bytes()), 400, "Content-Length {bad:?}");
        }
        let Parsed::Complete(r, _) = parse_head(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 05\r\n\r\n", peer()) else {
            panic!()
        };
        assert_eq!(r.content_length, 5);
    }

    #[test]
    fn duplicate_content_lengths_must_agree() {
        let same = b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(status_of(same), 200);
        let differ = b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(status_of(differ), 400);
    }

    #[test]
    fn bare_lf_line_ends_are_refused() {
        assert_eq!(status_of(b"GET / HTTP/1.1\nHost: x\n\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/1.1\r\nHost: x\n\r\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        assert_eq!(status_of(b"GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET / HTTP/1.0\r\n\r\n"), 200, "HTTP/1.0 has no Host requirement");
    }

    #[test]
    fn a_long_target_is_414_and_long_headers_stay_431() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(20_000));
        assert_eq!(status_of(long.as_bytes()), 414);
        // Still arriving, already too long for any target: refused without waiting for the rest.
        let arriving = format!("GET /{}", "a".repeat(MAX_TARGET_BYTES + 100));
        assert_eq!(status_of(arriving.as_bytes()), 414);
        let just_over = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(MAX_TARGET_BYTES));
        assert_eq!(status_of(just_over.as_bytes()), 414);
        let headers = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(status_of(headers.as_bytes()), 431);
    }

    #[test]
    fn absolute_form_targets_are_taken_as_their_path() {
        for (sent, path) in [
            ("http://host/x.narinfo", "/x.narinfo"),
            ("HTTP://host:8501/nar/a.nar?x=1", "/nar/a.nar?x=1"),
            ("https://host", "/"),
            ("http://host?q", "/?q"),
        ] {
            let head = format!("GET {sent} HTTP/1.1\r\nHost: host\r\n\r\n");
            let Parsed::Complete(r, _) = parse_head(head.as_bytes(), peer()) else { panic!("{sent}") };
            assert_eq!(r.target, path, "{sent}");
        }
        for bad in ["ftp://host/x", "http:///x", "x.narinfo"] {
            let head = format!("GET {bad} HTTP/1.1\r\nHost: host\r\n\r\n");
            assert_eq!(status_of(head.as_bytes()), 400, "{bad}");
        }
    }

    #[test]
    fn only_exactly_chunked_is_a_known_transfer_coding() {
        let te = |v: &str| format!("PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {v}\r\n\r\n");
        for unknown in ["gzip", "gzip, chunked", "chunked, chunked", "identity", "xchunked"] {
            assert_eq!(status_of(te(unknown).as_bytes()), 501, "{unknown}");
        }
        let Parsed::Complete(r, _) = parse_head(te("Chunked").as_bytes(), peer()) else { panic!() };
        assert!(r.chunked);
        let twice = b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(status_of(twice), 501);
        let with_length = b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(status_of(with_length), 400);
        assert_eq!(status_of(b"PUT /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
    }
}
