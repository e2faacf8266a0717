//! Talking HTTP to ncps and to the test upstream. [`http_get`] and friends are a tiny
//! HTTP/1.1 client (one request per connection, bodies decoded). [`RawConn`],
//! [`raw_request`] and [`raw_get_hashed`] send exactly the bytes a test chooses and report
//! exactly what came back, including how the body ended ([`BodyEnd`]): a reset, a clean
//! close or silence, which is what tells a truncated transfer from a complete one.

use super::crypto::Sha256;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The first header called `name` (case-insensitive).
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    find_header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

/// The code of a status line such as `HTTP/1.1 200 OK`.
fn parse_status(line: &str) -> io::Result<u16> {
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))
}

// ---------------------------------------------------------------------------
// Tiny HTTP/1.1 client
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn http_get(url: &str) -> io::Result<Response> {
    http_request("GET", url)
}

pub fn http_head(url: &str) -> io::Result<Response> {
    http_request("HEAD", url)
}

/// One request on a fresh connection (`Connection: close`), 10 s timeouts.
/// Handles Content-Length, chunked and read-to-close bodies.
pub fn http_request(method: &str, url: &str) -> io::Result<Response> {
    http_request_with(method, url, &[])
}

/// As [`http_request`], with these extra header lines (e.g. `Authorization`).
pub fn http_request_with(method: &str, url: &str, extra: &[(&str, &str)]) -> io::Result<Response> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| io::Error::other(format!("not an http URL: {url}")))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|e| io::Error::other(format!("{hostport}: {e}")))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    // An `Accept` of the caller's replaces the default one (two would be read as the first).
    let accept = if extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("accept")) { "" } else { "Accept: */*\r\n" };
    let extra: String = extra.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: ncps-e2e\r\n{accept}{extra}Connection: close\r\n\r\n"
    )?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = parse_status(&line)?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(resp);
    }
    if is_chunked(&resp.headers) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // trailers
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + size, 0);
            r.read_exact(&mut resp.body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        resp.body.resize(n, 0);
        r.read_exact(&mut resp.body)?;
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------
// Raw HTTP: exactly what goes over the wire, including how a body ends
// ---------------------------------------------------------------------------

/// How the server ended a response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// Clean end of stream (FIN).
    Eof,
    /// Connection reset (RST).
    Reset,
    /// Nothing more arrived within the read timeout (connection still open).
    TimedOut,
    /// Any other read error.
    Error(String),
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Everything after the head, as received (not de-chunked).
    pub body: Vec<u8>,
    pub end: BodyEnd,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Whether a client would take this for the whole of what it asked for: a
    /// 2xx with all Content-Length bytes, or a final chunk, or (no length) a
    /// clean close. A complete error answer (a 502, say) is not.
    pub fn looks_complete(&self) -> bool {
        if !(200..300).contains(&self.status) {
            return false;
        }
        if is_chunked(&self.headers) {
            return self.body.ends_with(b"0\r\n\r\n");
        }
        match self.content_length() {
            Some(n) => self.body.len() as u64 >= n,
            None => self.end == BodyEnd::Eof,
        }
    }
}

/// A connection on which the test controls every byte.
pub struct RawConn {
    pub stream: TcpStream,
    /// Bytes read past the response head, not yet handed out.
    pending: Vec<u8>,
}

fn classify(e: &io::Error) -> BodyEnd {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => BodyEnd::Reset,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => BodyEnd::TimedOut,
        _ => BodyEnd::Error(e.to_string()),
    }
}

impl RawConn {
    pub fn connect(addr: SocketAddr, read_timeout: Duration) -> io::Result<RawConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(read_timeout))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(RawConn {
            stream,
            pending: Vec::new(),
        })
    }

    /// A connection already made (for instance from another source address, [`connect_from`]).
    pub fn from_stream(stream: TcpStream, read_timeout: Duration) -> io::Result<RawConn> {
        stream.set_read_timeout(Some(read_timeout))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(RawConn { stream, pending: Vec::new() })
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Reads the status line and headers. Err if the connection ends first.
    pub fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        let mut buf = std::mem::take(&mut self.pending);
        let mut chunk = [0u8; 8192];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if buf.len() > 64 * 1024 {
                return Err(io::Error::other("response head larger than 64 KiB"));
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a complete response head ({} bytes: {:?})",
                        buf.len(),
                        String::from_utf8_lossy(&buf)
                    ),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        self.pending = buf[end + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status = parse_status(lines.next().unwrap_or(""))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok((status, headers))
    }

    /// Next piece of the body: Ok(0) on a clean end of stream.
    pub fn read_body_chunk(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        self.stream.read(buf)
    }

    /// Reads the body until the server ends it, passing each piece to `each`;
    /// returns the number of body bytes and how the body ended.
    pub fn drain_body(&mut self, mut each: impl FnMut(&[u8])) -> (u64, BodyEnd) {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match self.read_body_chunk(&mut buf) {
                Ok(0) => return (total, BodyEnd::Eof),
                Ok(n) => {
                    each(&buf[..n]);
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return (total, classify(&e)),
            }
        }
    }

    /// Reads head and the whole body (until the server closes or resets).
    pub fn read_response(&mut self) -> io::Result<RawResponse> {
        let (status, headers) = self.read_head()?;
        let mut body = Vec::new();
        let (_, end) = self.drain_body(|b| body.extend_from_slice(b));
        Ok(RawResponse {
            status,
            headers,
            body,
            end,
        })
    }
}

/// Sends `request` verbatim on a fresh connection and reads the response
/// until the server closes (or resets, or `read_timeout` passes quietly).
pub fn raw_request(
    addr: SocketAddr,
    request: &[u8],
    read_timeout: Duration,
) -> io::Result<RawResponse> {
    let mut c = RawConn::connect(addr, read_timeout)?;
    c.send(request)?;
    c.read_response()
}

/// `GET path` with `Connection: close`, as bytes.
pub fn get_request(path: &str) -> Vec<u8> {
    get_request_with(path, &[])
}

/// As [`get_request`], with more header lines.
pub fn get_request_with(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let more: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    format!("GET {path} HTTP/1.1\r\nHost: ncps-e2e\r\nUser-Agent: ncps-e2e-raw\r\n{more}Connection: close\r\n\r\n")
        .into_bytes()
}

/// Raw `GET path`, streaming the body through SHA-256 instead of keeping it.
pub struct HashedGet {
    pub status: u16,
    pub len: u64,
    pub sha256: [u8; 32],
    pub end: BodyEnd,
}

pub fn raw_get_hashed(addr: SocketAddr, path: &str, read_timeout: Duration) -> io::Result<HashedGet> {
    raw_get_hashed_with(addr, path, &[], read_timeout)
}

/// As [`raw_get_hashed`], with more request headers.
pub fn raw_get_hashed_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    read_timeout: Duration,
) -> io::Result<HashedGet> {
    let mut c = RawConn::connect(addr, read_timeout)?;
    c.send(&get_request_with(path, headers))?;
    let (status, _) = c.read_head()?;
    let mut h = Sha256::new();
    let (len, end) = c.drain_body(|b| h.update(b));
    Ok(HashedGet {
        status,
        len,
        sha256: h.finish(),
        end,
    })
}

/// A loopback port nothing listens on (bound then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A connection to `dst` from the loopback address `src` (e.g. 127.0.0.2: a second client
/// host), with the receive buffer set to `rcvbuf` bytes if given (a small one makes a slow
/// reader slow at once, instead of after megabytes of kernel buffers).
pub fn connect_from(src: std::net::IpAddr, dst: SocketAddr, rcvbuf: Option<usize>) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let (std::net::IpAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        return Err(io::Error::other("connect_from: IPv4 only"));
    };
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket descriptor, owned by the TcpStream made from it right away (so it
    // is closed on every path); the sockaddr_in values live across the calls that read them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        if let Some(n) = rcvbuf {
            let n = n as libc::c_int;
            let p = &n as *const libc::c_int as *const libc::c_void;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, p, std::mem::size_of::<libc::c_int>() as libc::socklen_t);
        }
        let from = sockaddr(src, 0);
        if libc::bind(fd, &from as *const libc::sockaddr_in as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let to = sockaddr(*dst.ip(), dst.port());
        if libc::connect(fd, &to as *const libc::sockaddr_in as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// One keep-alive exchange: sends `GET path` (keep-alive) and reads exactly its response
/// (head and Content-Length bytes), leaving the connection ready for the next. Returns the
/// status and the body length.
pub fn keep_alive_get(s: &mut TcpStream, path: &str) -> io::Result<(u16, u64)> {
    write!(s, "GET {path} HTTP/1.1\r\nHost: ncps-e2e\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the head ended"));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = parse_status(head.lines().next().unwrap_or(""))?;
    let len: u64 = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("no Content-Length"))?;
    let mut left = len;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = s.read(&mut buf[..left.min(64 * 1024) as usize])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-body"));
        }
        left -= n as u64;
    }
    Ok((status, len))
}
