//! gRPC over HTTP/2, one unary call at a time: what OTLP/gRPC needs, and no more (RFC 9113,
//! RFC 7541, gRPC's PROTOCOL-HTTP2.md). Cleartext ("h2c with prior knowledge") for `http://`,
//! TLS with ALPN `h2` (rustls, the roots HTTPS upstreams are checked against) for `https://`.
//!
//! The client sends the connection preface and its SETTINGS, then per call one HEADERS frame
//! (HPACK literals without Huffman coding or indexing: nothing to keep in step) and the
//! message as DATA frames with gRPC's 5-byte prefix, within the peer's flow-control windows.
//! It answers the peer's SETTINGS and PING, takes WINDOW_UPDATEs, and reads the response
//! HEADERS and trailers with a full HPACK decoder (static and dynamic tables, Huffman) to
//! find `:status` and `grpc-status`. One connection is kept and reused; any error drops it,
//! and the next call connects again. Everything has a timeout: this runs on the exporter
//! thread, never on a request's.

use super::huffman::BadHuffman;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The largest frame ncps accepts from a peer (the protocol's default maximum).
const MAX_FRAME: usize = 16_384;
/// Header blocks larger than this are refused (a collector's answer has a handful of fields).
const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// What went wrong on the HTTP/2 connection.
#[derive(Debug)]
#[non_exhaustive]
pub enum H2Error {
    Io(io::Error),
    /// The peer broke the protocol (or sent something this client does not take).
    Protocol(&'static str),
    /// The peer reset the stream or is going away.
    Reset(u32),
    GoAway(u32),
}

impl std::fmt::Display for H2Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H2Error::Io(e) => write!(f, "{e}"),
            H2Error::Protocol(why) => write!(f, "HTTP/2: {why}"),
            H2Error::Reset(code) => write!(f, "HTTP/2: stream reset by the collector (error code {code})"),
            H2Error::GoAway(code) => write!(f, "HTTP/2: the collector closed the connection (GOAWAY, error code {code})"),
        }
    }
}

impl std::error::Error for H2Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            H2Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for H2Error {
    fn from(e: io::Error) -> Self {
        H2Error::Io(e)
    }
}

impl From<BadHuffman> for H2Error {
    fn from(BadHuffman(why): BadHuffman) -> Self {
        H2Error::Protocol(why)
    }
}

/// A call that failed: where and why, and whether the same call may succeed later (not
/// reached, timed out, HTTP 429/502/503/504, a retryable gRPC status) or never will (any
/// other HTTP or gRPC status). What to do about it is the caller's business.
#[derive(Debug)]
pub struct CallError {
    pub why: String,
    pub retryable: bool,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl std::error::Error for CallError {}

/// Connect and whole-call timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub call: Duration,
}

// ---- HPACK ------------------------------------------------------------------------------

const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
];

/// The HPACK decoder's state: the dynamic table the peer's encoder fills.
pub struct Decoder {
    table: VecDeque<(String, String)>,
    size: usize,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { table: VecDeque::new(), size: 0, max: 4096 }
    }
}

/// An HPACK integer with an `n`-bit prefix, from `b` at `*at`.
fn integer(b: &[u8], at: &mut usize, n: u8) -> Result<usize, H2Error> {
    let bad = H2Error::Protocol("truncated header block");
    let mask = (1u16 << n) as usize - 1;
    let mut v = (*b.get(*at).ok_or(bad)? as usize) & mask;
    *at += 1;
    if v < mask {
        return Ok(v);
    }
    let mut shift = 0;
    loop {
        let byte = *b.get(*at).ok_or(H2Error::Protocol("truncated header block"))?;
        *at += 1;
        if shift > 28 {
            return Err(H2Error::Protocol("header integer too large"));
        }
        v += ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
}

fn string(b: &[u8], at: &mut usize) -> Result<String, H2Error> {
    let huffman = b.get(*at).is_some_and(|x| x & 0x80 != 0);
    let len = integer(b, at, 7)?;
    let raw = b.get(*at..*at + len).ok_or(H2Error::Protocol("truncated header string"))?;
    *at += len;
    let bytes = if huffman { super::huffman::decode(raw)? } else { raw.to_vec() };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

impl Decoder {
    fn get(&self, index: usize) -> Result<(String, String), H2Error> {
        match index {
            0 => Err(H2Error::Protocol("header index 0")),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.to_string(), v.to_string()))
            }
            _ => self.table.get(index - 62).cloned().ok_or(H2Error::Protocol("header index past the table")),
        }
    }

    fn insert(&mut self, name: String, value: String) {
        let size = name.len() + value.len() + 32;
        self.table.push_front((name, value));
        self.size += size;
        self.evict();
    }

    fn evict(&mut self) {
        while self.size > self.max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }

    /// Decodes one header block into (name, value) pairs.
    pub fn decode(&mut self, b: &[u8]) -> Result<Vec<(String, String)>, H2Error> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let first = b[at];
            if first & 0x80 != 0 {
                let i = integer(b, &mut at, 7)?;
                out.push(self.get(i)?);
            } else if first & 0xc0 == 0x40 {
                let i = integer(b, &mut at, 6)?;
                let name = if i == 0 { string(b, &mut at)? } else { self.get(i)?.0 };
                let value = string(b, &mut at)?;
                self.insert(name.clone(), value.clone());
                out.push((name, value));
            } else if first & 0xe0 == 0x20 {
                let max = integer(b, &mut at, 5)?;
                if max > 4096 {
                    return Err(H2Error::Protocol("dynamic table larger than allowed"));
                }
                self.max = max;
                self.evict();
            } else {
                // Literal without indexing (0000) or never indexed (0001): 4-bit prefix.
                let i = integer(b, &mut at, 4)?;
                let name = if i == 0 { string(b, &mut at)? } else { self.get(i)?.0 };
                let value = string(b, &mut at)?;
                out.push((name, value));
            }
        }
        Ok(out)
    }
}

/// A literal header field without indexing, with a static-table name (`index`) or a new name.
fn literal(out: &mut Vec<u8>, index: usize, name: &str, value: &str) {
    let int = |out: &mut Vec<u8>, mut v: usize, n: u8, pattern: u8| {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(pattern | v as u8);
            return;
        }
        out.push(pattern | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    };
    int(out, index, 4, 0);
    if index == 0 {
        int(out, name.len(), 7, 0);
        out.extend_from_slice(name.as_bytes());
    }
    int(out, value.len(), 7, 0);
    out.extend_from_slice(value.as_bytes());
}

/// The request header block of a gRPC call.
pub fn request_headers(authority: &str, path: &str, tls: bool, extra: &[(String, String)]) -> Vec<u8> {
    // :method POST, :scheme http or https (static 3, and 6 or 7).
    let mut b = vec![0x83, if tls { 0x87 } else { 0x86 }];
    literal(&mut b, 4, "", path); // :path
    literal(&mut b, 1, "", authority); // :authority
    literal(&mut b, 31, "", "application/grpc"); // content-type
    literal(&mut b, 0, "te", "trailers");
    literal(&mut b, 58, "", concat!("ncps/", env!("CARGO_PKG_VERSION"))); // user-agent
    for (k, v) in extra {
        // Metadata of the call (OTEL_EXPORTER_OTLP_HEADERS): lower-case names, checked in config.
        literal(&mut b, 0, k, v);
    }
    b
}

// ---- frames and the connection ----------------------------------------------------------

fn frame_head(kind: u8, flags: u8, stream: u32, len: usize) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, s[0] & 0x7f, s[1], s[2], s[3]]
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// The connection: a socket, or TLS over one.
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// The TLS client settings, made once: the roots HTTPS upstreams are checked against.
fn tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>, H2Error> {
    static CONFIG: std::sync::OnceLock<Result<std::sync::Arc<rustls::ClientConfig>, String>> = std::sync::OnceLock::new();
    let made = CONFIG.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::root_certs() {
            let _ = roots.add(rustls::pki_types::CertificateDer::from(c.der().to_vec()));
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(std::sync::Arc::new(config))
    });
    made.clone().map_err(|_| H2Error::Protocol("TLS settings could not be made"))
}

struct Conn {
    sock: Box<dyn Stream>,
    decoder: Decoder,
    next_stream: u32,
    /// The peer's windows for what ncps sends: the connection's, and the initial one of a stream.
    conn_window: i64,
    initial_window: i64,
    peer_max_frame: usize,
}

/// How a call ended, as far as HTTP/2 and gRPC say.
#[derive(Debug, Default)]
struct Outcome {
    status: Option<String>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    data: usize,
}

impl Conn {
    fn connect(authority: &str, tls: bool, timeouts: Timeouts) -> Result<Conn, H2Error> {
        let addr = authority
            .to_socket_addrs()?
            .next()
            .ok_or(H2Error::Protocol("the collector's address does not resolve"))?;
        let tcp = TcpStream::connect_timeout(&addr, timeouts.connect)?;
        tcp.set_read_timeout(Some(timeouts.call))?;
        tcp.set_write_timeout(Some(timeouts.call))?;
        let _ = tcp.set_nodelay(true);
        let sock: Box<dyn Stream> = if tls {
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|_| H2Error::Protocol("the collector's host is not a valid TLS name"))?;
            let conn = rustls::ClientConnection::new(tls_config()?, name)
                .map_err(|_| H2Error::Protocol("TLS could not start"))?;
            Box::new(rustls::StreamOwned::new(conn, tcp))
        } else {
            Box::new(tcp)
        };
        let mut c = Conn {
            sock,
            decoder: Decoder::default(),
            next_stream: 1,
            conn_window: 65_535,
            initial_window: 65_535,
            peer_max_frame: MAX_FRAME,
        };
        let mut hello = PREFACE.to_vec();
        // SETTINGS: ENABLE_PUSH (2) = 0.
        hello.extend_from_slice(&frame_head(SETTINGS, 0, 0, 6));
        hello.extend_from_slice(&[0, 2, 0, 0, 0, 0]);
        c.sock.write_all(&hello)?;
        Ok(c)
    }

    fn send_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Result<(), H2Error> {
        let mut f = frame_head(kind, flags, stream, payload.len()).to_vec();
        f.extend_from_slice(payload);
        self.sock.write_all(&f)?;
        Ok(())
    }

    fn read_frame(&mut self) -> Result<Frame, H2Error> {
        let mut head = [0u8; 9];
        self.sock.read_exact(&mut head)?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        if len > MAX_FRAME {
            return Err(H2Error::Protocol("frame larger than SETTINGS_MAX_FRAME_SIZE"));
        }
        let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
        let mut payload = vec![0u8; len];
        self.sock.read_exact(&mut payload)?;
        Ok(Frame { kind: head[3], flags: head[4], stream, payload })
    }

    /// Handles a frame that concerns the connection; returns the frame if it is about a stream.
    fn connection_frame(&mut self, f: Frame, stream_window: &mut i64) -> Result<Option<Frame>, H2Error> {
        match f.kind {
            SETTINGS if f.stream == 0 => {
                if f.flags & ACK == 0 {
                    for s in f.payload.chunks_exact(6) {
                        let id = u16::from_be_bytes([s[0], s[1]]);
                        let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                        match id {
                            0x4 => {
                                let delta = v as i64 - self.initial_window;
                                self.initial_window = v as i64;
                                *stream_window += delta;
                            }
                            0x5 => self.peer_max_frame = (v as usize).clamp(MAX_FRAME, 1 << 24),
                            _ => {}
                        }
                    }
                    self.send_frame(SETTINGS, ACK, 0, &[])?;
                }
                Ok(None)
            }
            PING if f.stream == 0 => {
                if f.flags & ACK == 0 {
                    self.send_frame(PING, ACK, 0, &f.payload)?;
                }
                Ok(None)
            }
            WINDOW_UPDATE => {
                let inc = f
                    .payload
                    .get(..4)
                    .map(|b| (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff) as i64)
                    .ok_or(H2Error::Protocol("short WINDOW_UPDATE"))?;
                if f.stream == 0 {
                    self.conn_window += inc;
                } else {
                    *stream_window += inc;
                }
                Ok(None)
            }
            GOAWAY => {
                let code = f.payload.get(4..8).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                Err(H2Error::GoAway(code))
            }
            _ if f.stream == 0 => Ok(None),
            _ => Ok(Some(f)),
        }
    }

    /// One unary call: the request, then frames until the response stream ends.
    fn call(
        &mut self,
        authority: &str,
        tls: bool,
        extra: &[(String, String)],
        path: &str,
        message: &[u8],
        deadline: Instant,
    ) -> Result<Outcome, H2Error> {
        let id = self.next_stream;
        self.next_stream += 2;
        let mut stream_window = self.initial_window;
        let block = request_headers(authority, path, tls, extra);
        self.send_frame(HEADERS, END_HEADERS, id, &block)?;
        let mut body = Vec::with_capacity(message.len() + 5);
        body.push(0);
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        let mut sent = 0;
        let mut outcome = Outcome::default();
        let mut block: Vec<u8> = Vec::new();
        let mut ended = false;
        while !ended {
            if Instant::now() > deadline {
                return Err(H2Error::Io(io::Error::new(io::ErrorKind::TimedOut, "the collector did not answer in time")));
            }
            // Send what the windows allow; the rest waits for WINDOW_UPDATEs.
            while sent < body.len() {
                let room = self.conn_window.min(stream_window).min(self.peer_max_frame as i64);
                if room <= 0 {
                    break;
                }
                let n = (body.len() - sent).min(room as usize);
                let last = sent + n == body.len();
                let chunk = body[sent..sent + n].to_vec();
                self.send_frame(DATA, if last { END_STREAM } else { 0 }, id, &chunk)?;
                sent += n;
                self.conn_window -= n as i64;
                stream_window -= n as i64;
            }
            let f = self.read_frame()?;
            let Some(f) = self.connection_frame(f, &mut stream_window)? else { continue };
            if f.stream != id {
                continue;
            }
            match f.kind {
                HEADERS | CONTINUATION => {
                    let mut p = &f.payload[..];
                    if f.kind == HEADERS {
                        let mut pad = 0;
                        if f.flags & PADDED != 0 {
                            pad = *p.first().ok_or(H2Error::Protocol("short HEADERS"))? as usize;
                            p = &p[1..];
                        }
                        if f.flags & PRIORITY != 0 {
                            p = p.get(5..).ok_or(H2Error::Protocol("short HEADERS"))?;
                        }
                        p = p.get(..p.len().checked_sub(pad).ok_or(H2Error::Protocol("bad padding"))?).unwrap_or(&[]);
                        if f.flags & END_STREAM != 0 {
                            ended = true;
                        }
                    }
                    block.extend_from_slice(p);
                    if block.len() > MAX_HEADER_BLOCK {
                        return Err(H2Error::Protocol("header block too large"));
                    }
                    if f.flags & END_HEADERS != 0 {
                        for (name, value) in self.decoder.decode(&block)? {
                            match name.as_str() {
                                ":status" => outcome.status = Some(value),
                                "grpc-status" => outcome.grpc_status = Some(value),
                                "grpc-message" => outcome.grpc_message = Some(value),
                                _ => {}
                            }
                        }
                        block.clear();
                    }
                }
                DATA => {
                    outcome.data += f.payload.len();
                    if !f.payload.is_empty() {
                        // Give the window back, so a long answer cannot stall.
                        let inc = (f.payload.len() as u32).to_be_bytes();
                        self.send_frame(WINDOW_UPDATE, 0, 0, &inc)?;
                        self.send_frame(WINDOW_UPDATE, 0, id, &inc)?;
                    }
                    if f.flags & END_STREAM != 0 {
                        ended = true;
                    }
                }
                RST_STREAM => {
                    let code = f.payload.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return Err(H2Error::Reset(code));
                }
                _ => {}
            }
        }
        Ok(outcome)
    }
}

/// gRPC status codes a later retry may get past (UNAVAILABLE, RESOURCE_EXHAUSTED,
/// DEADLINE_EXCEEDED, ABORTED), as the OTLP spec lists them.
fn retryable(code: &str) -> bool {
    matches!(code, "14" | "8" | "4" | "10")
}

/// A gRPC client for one collector (`http://host:port` or `https://host:port`).
pub struct GrpcClient {
    authority: String,
    tls: bool,
    headers: Vec<(String, String)>,
    timeouts: Timeouts,
    conn: Option<Conn>,
}

impl GrpcClient {
    pub fn new(url: &str, headers: Vec<(String, String)>, timeouts: Timeouts) -> GrpcClient {
        let tls = url.starts_with("https://");
        let authority = url.trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/').to_string();
        GrpcClient { authority, tls, headers, timeouts, conn: None }
    }

    /// Calls `path` with `message`; the answer's content does not matter, only its status.
    pub fn unary(&mut self, path: &str, message: &[u8]) -> Result<(), CallError> {
        let deadline = Instant::now() + self.timeouts.call;
        let reused = self.conn.is_some();
        let outcome = match self.attempt(path, message, deadline) {
            // A kept connection the collector closed meanwhile: once more, on a new one.
            Err(H2Error::Io(_) | H2Error::GoAway(_)) if reused => self.attempt(path, message, deadline),
            other => other,
        };
        let scheme = if self.tls { "https" } else { "http" };
        let where_ = || format!("{scheme}://{}{path}", self.authority);
        let outcome = outcome.map_err(|e| {
            self.conn = None;
            CallError { why: format!("{}: {e}", where_()), retryable: true }
        })?;
        match (outcome.status.as_deref(), outcome.grpc_status.as_deref()) {
            (Some("200"), Some("0")) => Ok(()),
            // No grpc-status at all but a whole answer: read as success (a proxy in between
            // may drop trailers).
            (Some("200"), None) if outcome.data >= 5 => Ok(()),
            (Some("200"), Some(code)) => {
                let msg = outcome.grpc_message.unwrap_or_default();
                Err(CallError { why: format!("{}: grpc-status {code} {msg}", where_()), retryable: retryable(code) })
            }
            (Some(s), _) => {
                let retryable = matches!(s, "429" | "502" | "503" | "504");
                Err(CallError { why: format!("{}: HTTP {s}", where_()), retryable })
            }
            (None, _) => {
                self.conn = None;
                Err(CallError { why: format!("{}: the stream ended without a response", where_()), retryable: true })
            }
        }
    }

    fn attempt(&mut self, path: &str, message: &[u8], deadline: Instant) -> Result<Outcome, H2Error> {
        if self.conn.as_ref().is_none_or(|c| c.next_stream > (1 << 30)) {
            self.conn = Some(Conn::connect(&self.authority, self.tls, self.timeouts)?);
        }
        let Some(conn) = self.conn.as_mut() else { return Err(H2Error::Protocol("no connection")) };
        let r = conn.call(&self.authority, self.tls, &self.headers, path, message, deadline);
        if r.is_err() {
            self.conn = None;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_decodes_the_rfc_examples_with_and_without_huffman_and_the_dynamic_table() {
        // RFC 7541 C.3.1 and C.3.2 (plain), then C.4.1 (Huffman): one decoder, so the second
        // block refers to entries the first added.
        let mut d = Decoder::default();
        let first = [
            0x82, 0x86, 0x84, 0x41, 0x0f, b'w', b'w', b'w', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c',
            b'o', b'm',
        ];
        let h = d.decode(&first).unwrap();
        assert_eq!(h[3], (":authority".to_string(), "www.example.com".to_string()));
        let second = [0x82, 0x86, 0x84, 0xbe, 0x58, 0x08, b'n', b'o', b'-', b'c', b'a', b'c', b'h', b'e'];
        let h = d.decode(&second).unwrap();
        assert_eq!(h[3], (":authority".to_string(), "www.example.com".to_string()));
        assert_eq!(h[4], ("cache-control".to_string(), "no-cache".to_string()));
        let mut d = Decoder::default();
        let huff = [0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
        assert_eq!(d.decode(&huff).unwrap()[3].1, "www.example.com");
    }

    #[test]
    fn the_request_headers_read_back_as_a_grpc_call() {
        let extra = [("authorization".to_string(), "Bearer t".to_string())];
        let block = request_headers("127.0.0.1:4317", "/opentelemetry.proto.collector.trace.v1.TraceService/Export", false, &extra);
        let h = Decoder::default().decode(&block).unwrap();
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get(":method"), Some("POST"));
        assert_eq!(get(":scheme"), Some("http"));
        assert_eq!(get(":path"), Some("/opentelemetry.proto.collector.trace.v1.TraceService/Export"));
        assert_eq!(get(":authority"), Some("127.0.0.1:4317"));
        assert_eq!(get("content-type"), Some("application/grpc"));
        assert_eq!(get("te"), Some("trailers"));
        assert_eq!(get("authorization"), Some("Bearer t"));
    }

    #[test]
    fn a_truncated_or_hostile_header_block_is_an_error_not_a_panic() {
        for bad in [&[0x41u8][..], &[0x41, 0x7f], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], &[0x80], &[0xbf, 0x40]] {
            assert!(Decoder::default().decode(bad).is_err(), "{bad:?}");
        }
    }
}
