//! A small HTTP/1.1 server made for serving files: requests in, [`Response`]s out.
//!
//! ncps needs three things general-purpose servers in its dependency budget do not give: file
//! bodies sent with `sendfile(2)` straight from the page cache, a fixed number of worker threads
//! that slow or idle clients cannot take (headers are read by one poll loop, and only complete
//! requests reach a worker), and timeouts on every read and write, with minimum rates for
//! request bodies and responses, so that no slow peer holds a worker for long. DESIGN.md has
//! the numbers that led here ("Why not tiny_http", "Isolation"). Handlers see a parsed [`Request`] and return a [`Response`]; they never touch
//! sockets.

mod body;
pub mod range;
mod request;
mod server;

pub use body::{client_gone, send_file, MinRate, Sent, FAST_FILE_MAX};

pub use request::{Method, Request};
pub use server::{per_host_cap, serve, Handler, Lane, ServerConfig};

use std::fs::File;

/// A body that is still being written by someone else (a download in progress). The server
/// sends the response head with the first bytes [`Growing::wait`] allows, then the rest as it
/// allows them. A failure before that first byte is answered 502; one after it aborts the
/// connection, so a client never mistakes a broken transfer for a complete one.
pub trait Growing: Send {
    /// The final length, announced as Content-Length.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The file the bytes are written to.
    fn file(&self) -> &File;
    /// Blocks until more than `sent` bytes may be sent and says where they are; `Err` when the
    /// transfer failed and the client must be cut off. While it waits it asks `client_gone`
    /// now and then, and gives up when that says yes: a client that left must not hold a
    /// worker until a slow download ends.
    fn wait(&self, sent: u64, client_gone: &dyn Fn() -> bool) -> Result<Chunk, Interrupted>;
}

/// Why a [`Growing`] body stopped before its end.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Interrupted {
    /// `client_gone` said yes: there is no one left to answer.
    ClientGone,
    /// The transfer failed (the client is answered 502, or cut off): why.
    Failed(std::sync::Arc<dyn std::error::Error + Send + Sync>),
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interrupted::ClientGone => f.write_str("the client went away"),
            Interrupted::Failed(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Interrupted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Interrupted::ClientGone => None,
            Interrupted::Failed(e) => Some(e.as_ref()),
        }
    }
}

/// The bytes of a [`Body::Stream`]: read from the start, or, for a range, started again at an
/// offset. An object store answers that with a ranged request, so a resumed 60 MiB NAR does
/// not read the 59 MiB before it.
pub trait Streamed: std::io::Read + Send {
    /// The bytes from `start` on, instead of from 0 (this stream has not been read).
    fn from_offset(self: Box<Self>, start: u64) -> std::io::Result<Box<dyn std::io::Read + Send>>;
}

/// The next part of a [`Growing`] body.
pub enum Chunk {
    /// The file holds the bytes up to this offset: send them from it.
    File { upto: u64 },
    /// The next bytes, from memory (the file could not take them, e.g. a full disk).
    Bytes(Vec<u8>),
}

pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from its start.
    File { file: File, len: u64 },
    Growing(Box<dyn Growing>),
    /// `len` bytes read from a stream (a blob of an object store), sent in chunks.
    Stream { reader: Box<dyn Streamed>, len: u64 },
    /// Only a length: valid for answers to HEAD, where no body is sent.
    Declared(u64),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
            Body::Growing(g) => g.len(),
            Body::Stream { len, .. } => *len,
            Body::Declared(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
    /// What the request log should say about how this was answered (`hit`, `miss`, ...).
    pub note: &'static str,
    /// The upstream a miss was fetched from, for the request log.
    pub upstream: Option<std::sync::Arc<str>>,
    /// Called once the response is sent (or given up), with what was sent: a growing body's
    /// answer is only known then (it may become a 502), so what counts it waits for this.
    pub on_sent: Option<OnSent>,
    /// Whether a `GET` may get a part of the body ([`range`]): then the head says
    /// `Accept-Ranges: bytes` (unless the body has a Content-Encoding, which is never sent in
    /// parts), and an `ETag` header, if the handler adds one, is what `If-Range` must match.
    pub ranges: bool,
}

/// See [`Response::on_sent`].
pub type OnSent = Box<dyn FnOnce(&Sent) + Send>;

impl Response {
    pub fn new(status: u16, content_type: &str, body: Body) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body,
            note: "",
            upstream: None,
            on_sent: None,
            ranges: false,
        }
    }

    /// A short plain-text answer, for errors and small endpoints.
    pub fn text(status: u16, text: impl Into<String>) -> Response {
        Self::new(status, "text/plain; charset=utf-8", Body::Bytes(text.into().into_bytes()))
    }

    pub fn not_found() -> Response {
        Self::text(404, "Not Found\n")
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Lets a `GET` ask for a part of the body; `etag` is its strong tag (quoted), if known.
    /// Never for a body with a `Content-Encoding`: a range would be of the encoded bytes,
    /// which clients (and Nix) take to be of the plain ones; such a response keeps neither
    /// `Accept-Ranges` nor an ETag.
    pub fn with_ranges(mut self, etag: Option<String>) -> Response {
        if self.header("Content-Encoding").is_some() {
            return self;
        }
        self.ranges = true;
        if let Some(tag) = etag {
            self.headers.push(("ETag", tag));
        }
        self
    }

    /// The first header the handler set with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn with_note(mut self, note: &'static str) -> Response {
        self.note = note;
        self
    }

    pub fn with_upstream(mut self, upstream: std::sync::Arc<str>) -> Response {
        self.upstream = Some(upstream);
        self
    }

    /// How the request log describes this answer: `hit`, or `miss via http://upstream`.
    pub fn log_note(&self) -> String {
        match &self.upstream {
            Some(u) => format!("{} via {u}", self.note),
            None => self.note.to_string(),
        }
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Whether an `Accept-Encoding` header (RFC 9110 12.5.3) takes `zstd`: named, or `*`, with a
/// q-value above 0 (`zstd;q=0` refuses it, as `*;q=0` refuses everything not named).
pub fn accepts_zstd(header: Option<&str>) -> bool {
    let Some(h) = header else { return false };
    let mut star = None;
    for item in h.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
            .filter_map(|v| v.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        if coding.eq_ignore_ascii_case("zstd") {
            return q > 0.0;
        }
        if coding == "*" {
            star = Some(q > 0.0);
        }
    }
    star.unwrap_or(false)
}

#[cfg(test)]
mod encoding_tests {
    use super::accepts_zstd;

    #[test]
    fn zstd_is_taken_when_named_or_starred_with_a_q_above_zero() {
        assert!(accepts_zstd(Some("zstd, br, gzip, deflate, bzip2, xz")), "Nix 2.14-2.33");
        assert!(accepts_zstd(Some("gzip;q=0.5, ZSTD;q=0.8")));
        assert!(accepts_zstd(Some("*")));
        assert!(!accepts_zstd(None), "Nix 2.8 sends none");
        assert!(!accepts_zstd(Some("gzip, br")));
        assert!(!accepts_zstd(Some("zstd;q=0, *")), "named and refused");
        assert!(!accepts_zstd(Some("*;q=0")));
        assert!(!accepts_zstd(Some("identity")));
        assert!(!accepts_zstd(Some("")));
    }
}
