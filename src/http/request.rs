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

pub fn parse_head(buf: &[u8], peer: SocketAddr) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Parsed::Invalid(431, "request head too large".into())
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(431, "too many headers".into())
        }
        Err(e) => return Parsed::Invalid(400, format!("malformed request: {e}")),
    };
    if n > MAX_HEAD_BYTES {
        return Parsed::Invalid(431, "request head too large".into());
    }
    let (Some(method_text), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid(400, "incomplete request line".into());
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
    let mut connection = String::new();
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            return Parsed::Invalid(400, format!("header {} is not UTF-8", h.name));
        };
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let Ok(len) = value.parse::<u64>() else {
                return Parsed::Invalid(400, format!("bad Content-Length {value:?}"));
            };
            // Two different lengths is the classic request-smuggling trick; refuse it.
            if content_length.is_some_and(|l| l != len) {
                return Parsed::Invalid(400, "conflicting Content-Length headers".into());
            }
            content_length = Some(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
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
    let keep_alive = match minor {
        1 => !connection.contains("close"),
        _ => connection.contains("keep-alive"),
    };
    Parsed::Complete(
        Request {
            method,
            method_text: method_text.to_string(),
            target: target.to_string(),
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
}
