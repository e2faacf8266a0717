//! Writing responses to a socket: heads, byte bodies, and file bodies by `sendfile(2)`.

use super::range::{self, Part};
use super::{reason, Body, Chunk, Interrupted, Method, Request, Response, Streamed};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Bodies up to this size are read into the head's buffer and sent with one write: for small
/// files (narinfos) one syscall beats a write plus a sendfile.
const INLINE_FILE_BYTES: u64 = 16 * 1024;

/// The largest file body [`super::Handler::fast`] may answer with (the poll loop sends it
/// with one write, like any inline body).
pub const FAST_FILE_MAX: u64 = INLINE_FILE_BYTES;

/// The most one `sendfile` call is asked to send. In pinned runs (server on one core, curl on
/// the other, loaded machine) 64 MiB hits went from about nginx's rate with one call for the
/// whole file to 1.3-1.8x it with 512 KiB-8 MiB per call (nginx's own `sendfile_max_chunk`
/// is 2 MiB). DESIGN.md, "Hits", has the numbers.
const SENDFILE_CHUNK: u64 = 2 << 20;

/// `TCP_CORK` on a socket for as long as it lives: only full segments leave until it is
/// dropped, which sends the rest at once. A large file body is corked from its head to its
/// last byte, as nginx does (`tcp_nopush on`): under `TCP_NODELAY` each time a blocking
/// `sendfile` waits for room in the send buffer the kernel pushes the partial segment it
/// holds, and on an Intel host (2026-12-07) that held pinned 64 MiB hits at 1,412 MiB/s
/// against 2,198 corked and nginx's 1,862 (DESIGN.md, "Hits"). Streams of a download in
/// progress are not corked: their bytes should leave as they come.
struct Cork<'a>(&'a TcpStream);

impl<'a> Cork<'a> {
    fn new(sock: &'a TcpStream) -> Cork<'a> {
        set_cork(sock, true);
        Cork(sock)
    }
}

impl Drop for Cork<'_> {
    fn drop(&mut self) {
        set_cork(self.0, false);
    }
}

/// Sets or clears `TCP_CORK`. A failure only costs speed (the body still goes out), so it is
/// ignored.
fn set_cork(sock: &TcpStream, on: bool) {
    set_option(sock, libc::IPPROTO_TCP, libc::TCP_CORK, &libc::c_int::from(on));
}

/// `setsockopt` of one plain value (an int, a `linger`); its result is ignored, as both
/// callers can do nothing better than go on without the option.
fn set_option<T: Copy>(sock: &TcpStream, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: a valid socket descriptor (borrowed for the call), and a pointer to a live,
    // initialised `T` whose size is passed with it.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        );
    }
}

/// Sends `len` bytes of `file` from `offset` to `sock`, inside the kernel.
///
/// The socket's write timeout bounds every call, so a client that stops reading ends this with
/// `TimedOut` instead of holding the thread.
pub fn send_file(sock: &TcpStream, file: &File, offset: u64, len: u64) -> io::Result<()> {
    send_file_paced(sock, file, offset, len, &mut Pace::new(MinRate::OFF))
}

/// [`send_file`], cut off with `TimedOut` when the client reads slower than `pace` allows.
fn send_file_paced(sock: &TcpStream, file: &File, offset: u64, len: u64, pace: &mut Pace) -> io::Result<()> {
    let mut off = offset as libc::off_t;
    let end = offset + len;
    while (off as u64) < end {
        let chunk = (end - off as u64).min(SENDFILE_CHUNK) as usize;
        let start = std::time::Instant::now();
        // SAFETY: both descriptors are open for the duration of the call (borrowed), and `off`
        // is a valid, exclusively borrowed off_t.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, chunk) };
        let got = sent(n);
        pace.record(*got.as_ref().ok().and_then(|n| n.as_ref()).unwrap_or(&0) as u64, start.elapsed()).map_err(too_slow(sock))?;
        let Some(n) = got? else { continue };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than announced"));
        }
    }
    Ok(())
}

/// `write_all` of `bytes`, cut off with `TimedOut` when the client reads slower than `pace` allows.
fn write_all_paced(mut sock: &TcpStream, mut bytes: &[u8], pace: &mut Pace) -> io::Result<()> {
    while !bytes.is_empty() {
        let start = std::time::Instant::now();
        let got = sock.write(bytes);
        pace.record(*got.as_ref().unwrap_or(&0) as u64, start.elapsed()).map_err(too_slow(sock))?;
        match got {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed")),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The error for a client found too slow. The coming close becomes a reset ([`abort`]):
/// megabytes may still sit in the socket's send buffer, which a slow reader would otherwise
/// go on reading for minutes after it was cut off.
fn too_slow(sock: &TcpStream) -> impl FnOnce(TooSlow) -> io::Error + '_ {
    move |s| {
        abort(sock);
        io::Error::new(io::ErrorKind::TimedOut, s)
    }
}

/// The slowest a transfer may go: at least `bytes_per_sec` on average over each `window` of
/// time spent blocked in the socket (a send that waits because the client does not read, a
/// read that waits for bytes of a body). Time spent elsewhere (a growing body waiting for its
/// upstream, the disk) is not counted, so only the client's own pace is judged. The first
/// window includes the socket buffers filling, so a reader is judged from the second.
///
/// Why a rate and not only the write timeout: the timeout is per call, so a client reading a
/// few bytes a second never trips it, and held a worker ~17 h on a 64 MiB NAR at 1 KiB/s
/// (`curl --limit-rate`); with the default 16 KiB/s over 10 s windows it is cut off after
/// about 20 s of its reading below the rate (DESIGN.md, "Isolation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinRate {
    /// 0: no minimum.
    pub bytes_per_sec: u64,
    pub window: std::time::Duration,
}

impl MinRate {
    pub const OFF: MinRate = MinRate { bytes_per_sec: 0, window: std::time::Duration::from_secs(10) };
    /// The window every minimum rate is judged over.
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn per_sec(bytes_per_sec: u64) -> MinRate {
        MinRate { bytes_per_sec, window: Self::WINDOW }
    }
}

/// A transfer found slower than its [`MinRate`]: what it managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooSlow {
    pub bytes: u64,
    pub blocked: std::time::Duration,
    pub rule: MinRate,
}

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "slower than the minimum {} B/s: {} bytes in {:.1}s of waiting on the client",
            self.rule.bytes_per_sec,
            self.bytes,
            self.blocked.as_secs_f64()
        )
    }
}

impl std::error::Error for TooSlow {}

/// What one window of a transfer says about its pace.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The window is not over yet.
    Open,
    /// The window is over and fast enough: start the next.
    Passed,
    TooSlow,
}

/// The pure rule behind [`Pace`]: `bytes` moved in `blocked` time of the current window.
pub fn verdict(bytes: u64, blocked: std::time::Duration, rule: MinRate) -> Verdict {
    if rule.bytes_per_sec == 0 || blocked < rule.window {
        return Verdict::Open;
    }
    // Judged against the window, not the (possibly longer) time blocked: a single call may run
    // past the window's end, and that overrun must not make the client look slower.
    let needed = rule.bytes_per_sec as u128 * rule.window.as_millis() / 1000;
    if (bytes as u128) < needed {
        Verdict::TooSlow
    } else {
        Verdict::Passed
    }
}

/// The state of a [`MinRate`] over one transfer.
#[derive(Debug)]
pub struct Pace {
    rule: MinRate,
    bytes: u64,
    blocked: std::time::Duration,
}

impl Pace {
    pub fn new(rule: MinRate) -> Pace {
        Pace { rule, bytes: 0, blocked: std::time::Duration::ZERO }
    }

    /// Counts one socket call that moved `bytes` in `took`.
    pub fn record(&mut self, bytes: u64, took: std::time::Duration) -> Result<(), TooSlow> {
        self.bytes += bytes;
        self.blocked += took;
        match verdict(self.bytes, self.blocked, self.rule) {
            Verdict::Open => Ok(()),
            Verdict::Passed => {
                (self.bytes, self.blocked) = (0, std::time::Duration::ZERO);
                Ok(())
            }
            Verdict::TooSlow => Err(TooSlow { bytes: self.bytes, blocked: self.blocked, rule: self.rule }),
        }
    }
}

/// What [`write_response`] is asked to send of a response: which part of its body, with
/// what status, and whether only the head.
struct Plan {
    status: u16,
    /// Offset of the first body byte to send, and how many (the Content-Length).
    start: u64,
    len: u64,
    /// The `Content-Range` of a `206`.
    content_range: Option<String>,
    head_only: bool,
    keep_alive: bool,
}

impl Plan {
    fn whole(resp: &Response, head_only: bool, keep_alive: bool) -> Plan {
        Plan { status: resp.status, start: 0, len: resp.body.len(), content_range: None, head_only, keep_alive }
    }
}

/// Whether `resp`'s body goes out with a Content-Encoding (then it is never sent in parts).
fn encoded(resp: &Response) -> bool {
    resp.header("content-encoding").is_some()
}

fn head(resp: &Response, plan: &Plan) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    write!(out, "HTTP/1.1 {} {}\r\nServer: ncps\r\nContent-Length: {}\r\n", plan.status, reason(plan.status), plan.len)?;
    for (k, v) in &resp.headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    if resp.ranges && !encoded(resp) {
        out.extend_from_slice(b"Accept-Ranges: bytes\r\n");
    }
    if let Some(r) = &plan.content_range {
        write!(out, "Content-Range: {r}\r\n")?;
    }
    if !plan.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// The whole of a small response (head and body) as bytes, for sending without waiting.
/// Errors for bodies that are not small.
pub fn render_small(resp: Response, head_only: bool, keep_alive: bool) -> io::Result<Vec<u8>> {
    let plan = Plan::whole(&resp, head_only, keep_alive);
    render(resp, &plan)
}

fn render(resp: Response, plan: &Plan) -> io::Result<Vec<u8>> {
    let mut out = head(&resp, plan)?;
    if plan.head_only {
        return Ok(out);
    }
    let (start, len) = (plan.start as usize, plan.len as usize);
    match resp.body {
        Body::Empty => {}
        Body::Bytes(b) => out.extend_from_slice(&b[start..start + len]),
        Body::File { file, .. } if plan.len <= INLINE_FILE_BYTES => {
            let at = out.len();
            out.resize(at + len, 0);
            read_exact_at(&file, &mut out[at..], plan.start)?;
        }
        Body::Stream { reader, .. } if plan.len <= INLINE_FILE_BYTES => {
            let at = out.len();
            out.resize(at + len, 0);
            stream_from(reader, plan.start)?.read_exact(&mut out[at..])?;
        }
        _ => return Err(io::Error::other("not a small response")),
    }
    Ok(out)
}

/// What [`write_response`] sent: the status (not always the handler's, see below), the
/// number of body bytes, and why the handler's answer was replaced, if it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status: u16,
    pub bytes: u64,
    pub replaced_because: Option<String>,
}

/// Which part of `resp`'s body `req` gets ([`range::choose`]); the whole unless the handler
/// made it rangeable.
pub fn part_for(req: &Request, resp: &Response) -> Part {
    if !resp.ranges {
        return Part::Whole;
    }
    let asked = range::Asked { get: req.method == Method::Get, range: req.header("range"), if_range: req.header("if-range") };
    range::choose(&asked, resp.header("etag"), resp.body.len(), encoded(resp))
}

/// Writes `part` of `resp` (its head, and its body unless `head_only`).
///
/// A growing body's head waits for its first bytes: a download that fails before any arrive
/// (upstream refused, hung, answered an error, or a small NAR held back whole failed its hash)
/// is answered `502 Bad Gateway` with the reason, which a client reports as such and retries,
/// rather than a `200` cut off at byte 0. A range of a growing body waits the same way for its
/// own first byte, however far into the download that lies.
///
/// The head of a large body is sent with `MSG_MORE`, so it shares its first segment with
/// the body; the body goes out in [`SENDFILE_CHUNK`]s; a file body is corked ([`Cork`]).
///
/// Large bodies are held to `min_rate` ([`MinRate`]): a client that reads slower is cut off
/// with `TimedOut`.
pub fn write_response(
    sock: &mut TcpStream,
    mut resp: Response,
    part: Part,
    head_only: bool,
    keep_alive: bool,
    min_rate: MinRate,
) -> io::Result<Sent> {
    let mut pace = Pace::new(min_rate);
    let full = resp.body.len();
    if part == Part::Unsatisfiable {
        let mut refused = Response::text(416, "Range Not Satisfiable\n");
        refused.ranges = true;
        if let Some(tag) = resp.header("etag") {
            refused.headers.push(("ETag", tag.to_string()));
        }
        let plan = Plan { content_range: range::content_range(part, full), ..Plan::whole(&refused, head_only, keep_alive) };
        let bytes = if head_only { 0 } else { plan.len };
        sock.write_all(&render(refused, &plan)?)?;
        return Ok(Sent { status: 416, bytes, replaced_because: None });
    }
    let (start, len) = part.span(full);
    let status = if matches!(part, Part::Range { .. }) { 206 } else { resp.status };
    let plan = Plan { status, start, len, content_range: range::content_range(part, full), head_only, keep_alive };
    let small = match &resp.body {
        Body::Empty | Body::Bytes(_) => true,
        Body::File { .. } | Body::Stream { .. } => len <= INLINE_FILE_BYTES,
        _ => false,
    };
    if small || head_only {
        sock.write_all(&render(resp, &plan)?)?;
        return Ok(Sent { status, bytes: if head_only { 0 } else { len }, replaced_because: None });
    }
    match resp.body {
        Body::File { ref file, .. } => {
            // Uncorked when this arm ends, whatever happened: the last segment leaves at once.
            let _corked = Cork::new(sock);
            send_more(sock, &head(&resp, &plan)?)?;
            send_file_paced(sock, file, start, len, &mut pace)?;
        }
        Body::Stream { .. } => {
            let Body::Stream { reader, .. } = std::mem::replace(&mut resp.body, Body::Declared(full)) else {
                return Err(io::Error::other("a stream body changed kind"));
            };
            // Opened before the head goes out: a store that cannot give the range now is a
            // 500 from the caller's error, not a 200 cut off at byte 0.
            let mut reader = stream_from(reader, start)?;
            send_more(sock, &head(&resp, &plan)?)?;
            if let Err(e) = copy_stream(&mut reader, sock, len, &mut pace) {
                abort(sock);
                return Err(e);
            }
        }
        Body::Declared(_) | Body::Empty | Body::Bytes(_) => {
            // A length-only body answering a GET is a handler bug: the head would promise
            // bytes there are none of. (Small bodies were sent above.)
            return Err(io::Error::other("a length-only body cannot answer a GET"));
        }
        Body::Growing(ref g) => {
            let end = start + len;
            let first = if len == 0 { None } else { Some(g.wait(start, &|| peer_gone(sock))) };
            if let Some(Err(why)) = first {
                if matches!(why, Interrupted::ClientGone) {
                    return Err(io::Error::other(why));
                }
                let why = why.to_string();
                let failed = Response::text(502, format!("Bad Gateway: {why}\n"));
                let bytes = failed.body.len();
                sock.write_all(&render_small(failed, false, keep_alive)?)?;
                return Ok(Sent { status: 502, bytes, replaced_because: Some(why) });
            }
            send_more(sock, &head(&resp, &plan)?)?;
            let mut next = first;
            let mut sent = start;
            while sent < end {
                let chunk = match next.take() {
                    Some(c) => c,
                    None => g.wait(sent, &|| peer_gone(sock)),
                };
                match chunk {
                    Ok(Chunk::File { upto }) => {
                        let upto = upto.min(end);
                        if upto > sent {
                            send_file_paced(sock, g.file(), sent, upto - sent, &mut pace)?;
                            sent = upto;
                        }
                    }
                    Ok(Chunk::Bytes(b)) => {
                        let b = &b[..b.len().min((end - sent) as usize)];
                        write_all_paced(sock, b, &mut pace)?;
                        sent += b.len() as u64;
                    }
                    Err(why) => {
                        abort(sock);
                        return Err(io::Error::other(why));
                    }
                }
            }
        }
    }
    Ok(Sent { status, bytes: len, replaced_because: None })
}

/// How much of a [`Body::Stream`] is read before it is written: large enough that a write
/// is one or two TCP windows, small enough that a thousand hits in flight hold 256 MiB at most.
const STREAM_CHUNK: usize = 256 << 10;

/// `stream` from `start` (itself when 0).
fn stream_from(stream: Box<dyn Streamed>, start: u64) -> io::Result<Box<dyn io::Read + Send>> {
    if start == 0 {
        Ok(Box::new(stream))
    } else {
        stream.from_offset(start)
    }
}

/// Sends `len` bytes of `reader`, a chunk in memory at a time; a stream that ends early is an
/// error (the head promised `len`).
fn copy_stream(reader: &mut dyn io::Read, sock: &TcpStream, len: u64, pace: &mut Pace) -> io::Result<()> {
    let mut buf = vec![0u8; STREAM_CHUNK.min(len as usize)];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stored blob shorter than announced")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        write_all_paced(sock, &buf[..n], pace)?;
        left -= n as u64;
    }
    Ok(())
}

/// Writes all of `bytes` with `MSG_MORE`: they wait (at most ~200 ms, in practice until the
/// `sendfile` that follows at once) to share a segment with what comes next.
fn send_more(sock: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: a valid socket descriptor and a live buffer of the given length.
        let n = unsafe {
            libc::send(sock.as_raw_fd(), bytes.as_ptr() as *const libc::c_void, bytes.len(), libc::MSG_MORE | libc::MSG_NOSIGNAL)
        };
        let Some(n) = sent(n)? else { continue };
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Whether the client closed its end (or the connection broke), without blocking. A request
/// still unread (pipelining) is not a hang-up.
fn peer_gone(sock: &TcpStream) -> bool {
    fd_peer_gone(sock.as_raw_fd())
}

thread_local! {
    /// The socket of the request this worker thread is answering, while its handler runs.
    static ANSWERING: std::cell::Cell<Option<std::os::fd::RawFd>> = const { std::cell::Cell::new(None) };
}

/// Marks `sock` as the client of the handler about to run on this thread, until dropped.
pub(super) struct Answering(());

impl Answering {
    pub(super) fn start(sock: &TcpStream) -> Answering {
        ANSWERING.with(|a| a.set(Some(sock.as_raw_fd())));
        Answering(())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        ANSWERING.with(|a| a.set(None));
    }
}

/// Whether the client of the request this thread's handler is answering has left (closed its
/// end, or the connection broke). A handler that waits for someone else (an upstream lookup)
/// asks this now and then, so that work nobody wants any more can stop. False outside a
/// handler.
pub fn client_gone() -> bool {
    ANSWERING.with(|a| a.get()).is_some_and(fd_peer_gone)
}

fn fd_peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid, initialised pollfd, and a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Makes the coming close of `sock` a TCP reset, so the client sees a failed transfer at once
/// rather than a clean end of stream. The caller drops the socket after this.
pub fn abort(sock: &TcpStream) {
    set_option(sock, libc::SOL_SOCKET, libc::SO_LINGER, &libc::linger { l_onoff: 1, l_linger: 0 });
}

/// What a `send`/`sendfile` return value means: bytes sent, `None` to try again (a signal),
/// or the error (a socket whose send timeout ran out reads as "client stopped reading").
fn sent(n: isize) -> io::Result<Option<isize>> {
    if n >= 0 {
        return Ok(Some(n));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::Interrupted => Ok(None),
        io::ErrorKind::WouldBlock => Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Growing;
    use std::io::Read;
    use std::net::TcpListener;

    /// A body whose download fails after `ok` bytes.
    struct FailsAfter {
        file: File,
        len: u64,
        ok: u64,
    }

    impl Growing for FailsAfter {
        fn len(&self) -> u64 {
            self.len
        }
        fn file(&self) -> &File {
            &self.file
        }
        fn wait(&self, sent: u64, _: &dyn Fn() -> bool) -> Result<Chunk, Interrupted> {
            if sent < self.ok {
                Ok(Chunk::Bytes(vec![b'x'; (self.ok - sent) as usize]))
            } else {
                Err(Interrupted::Failed(std::sync::Arc::from(Box::<dyn std::error::Error + Send + Sync>::from("upstream reset"))))
            }
        }
    }

    /// What a client reads when `body` is sent to it: the bytes, and whether the
    /// connection ended cleanly.
    fn send(body: FailsAfter) -> (Result<Sent, String>, Vec<u8>, bool) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let resp = Response::new(200, "application/x-nix-nar", Body::Growing(Box::new(body)));
        let sent = write_response(&mut server, resp, Part::Whole, false, true, MinRate::OFF).map_err(|e| e.to_string());
        drop(server);
        let mut got = Vec::new();
        let clean = client.read_to_end(&mut got).is_ok();
        (sent, got, clean)
    }

    fn get_with(headers: &str) -> Request {
        let head = format!("GET /nar/x.nar HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        match crate::http::request::parse_head(head.as_bytes(), "127.0.0.1:1".parse().unwrap()) {
            crate::http::request::Parsed::Complete(r, _) => r,
            _ => panic!("test request did not parse"),
        }
    }

    /// What a client reads for `resp` asked for by `req`.
    fn exchange(req: &Request, resp: Response) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let part = part_for(req, &resp);
        write_response(&mut server, resp, part, false, false, MinRate::OFF).unwrap();
        drop(server);
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        got
    }

    fn nar(body: &[u8]) -> Response {
        Response::new(200, "application/x-nix-nar", Body::Bytes(body.to_vec())).with_ranges(Some("\"t\"".into()))
    }

    /// A stream over bytes that says where it was started from.
    struct Streaming {
        bytes: std::io::Cursor<Vec<u8>>,
        started_at: std::sync::Arc<std::sync::Mutex<Option<u64>>>,
    }

    impl std::io::Read for Streaming {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.bytes.read(buf)
        }
    }

    impl crate::http::Streamed for Streaming {
        fn from_offset(mut self: Box<Self>, start: u64) -> std::io::Result<Box<dyn std::io::Read + Send>> {
            *self.started_at.lock().unwrap() = Some(start);
            self.bytes.set_position(start);
            Ok(self)
        }
    }

    fn streamed(bytes: &[u8]) -> (Response, std::sync::Arc<std::sync::Mutex<Option<u64>>>) {
        let started_at = std::sync::Arc::new(std::sync::Mutex::new(None));
        let reader = Box::new(Streaming { bytes: std::io::Cursor::new(bytes.to_vec()), started_at: started_at.clone() });
        let body = Body::Stream { reader, len: bytes.len() as u64 };
        (Response::new(200, "application/x-nix-nar", body).with_ranges(Some("\"t\"".into())), started_at)
    }

    /// What a client reading on another thread gets for `resp` asked for by `req`: what was
    /// sent, the body bytes, and whether the connection ended cleanly.
    fn exchange_bytes(req: &Request, resp: Response) -> (std::io::Result<Sent>, Vec<u8>, bool) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let reading = std::thread::spawn(move || {
            let mut raw = Vec::new();
            let clean = client.read_to_end(&mut raw).is_ok();
            (raw, clean)
        });
        let part = part_for(req, &resp);
        let sent = write_response(&mut server, resp, part, false, false, MinRate::OFF);
        drop(server);
        let (raw, clean) = reading.join().unwrap();
        let body = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(at) => raw[at + 4..].to_vec(),
            None => Vec::new(),
        };
        (sent, body, clean)
    }

    #[test]
    fn a_stream_body_is_sent_whole_with_its_length_and_a_range_of_it_starts_the_stream_at_the_offset() {
        let big: Vec<u8> = (0..(3 * STREAM_CHUNK + 7)).map(|i| (i % 251) as u8).collect();
        let (resp, started_at) = streamed(&big);
        let (sent, body, clean) = exchange_bytes(&get_with(""), resp);
        assert_eq!((sent.unwrap().status, body.len(), clean), (200, big.len(), true));
        assert!(body == big);
        assert_eq!(*started_at.lock().unwrap(), None, "read from the start, not reopened");
        let (resp, started_at) = streamed(&big);
        let req = get_with(&format!("Range: bytes={}-\r\n", STREAM_CHUNK + 1));
        let (sent, body, _) = exchange_bytes(&req, resp);
        assert_eq!(sent.unwrap().status, 206);
        assert!(body == big[STREAM_CHUNK + 1..]);
        assert_eq!(*started_at.lock().unwrap(), Some(STREAM_CHUNK as u64 + 1), "the range was asked of the stream");
        // Small ones go out with their head in one write, ranges too.
        let (resp, _) = streamed(b"0123456789");
        let got = exchange(&get_with("Range: bytes=2-4\r\n"), resp);
        assert!(got.starts_with("HTTP/1.1 206") && got.ends_with("\r\n\r\n234"), "{got}");
    }

    fn cork_of(sock: &TcpStream) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut n = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket, and pointers to a live c_int and its size.
        let rc = unsafe {
            libc::getsockopt(sock.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CORK, &mut v as *mut libc::c_int as *mut libc::c_void, &mut n)
        };
        assert_eq!(rc, 0);
        v
    }

    #[test]
    fn a_large_file_body_goes_out_whole_and_leaves_the_socket_uncorked_for_the_next_response() {
        let dir = std::env::temp_dir().join(format!("ncps-cork-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nar");
        let big: Vec<u8> = (0..(3 * INLINE_FILE_BYTES as usize + 5)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &big).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let reading = std::thread::spawn(move || {
            let mut raw = Vec::new();
            client.read_to_end(&mut raw).map(|_| raw)
        });
        let resp = Response::new(200, "application/x-nix-nar", Body::File { file: File::open(&path).unwrap(), len: big.len() as u64 });
        let sent = write_response(&mut server, resp, Part::Whole, false, true, MinRate::OFF).unwrap();
        assert_eq!((sent.status, sent.bytes), (200, big.len() as u64));
        // Corked while it was sent (Cork), uncorked once it was: a keep-alive connection's
        // next small answer is not held back.
        assert_eq!(cork_of(&server), 0, "the socket is uncorked after the body");
        drop(server);
        let raw = reading.join().unwrap().unwrap();
        assert!(raw.ends_with(&big), "the whole body arrived after its head");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_stream_that_ends_before_its_announced_length_resets_the_connection() {
        let (mut resp, _) = streamed(&vec![b'x'; 100_000]);
        resp.body = match resp.body {
            Body::Stream { reader, .. } => Body::Stream { reader, len: 200_000 },
            other => other,
        };
        let (sent, body, clean) = exchange_bytes(&get_with(""), resp);
        assert!(sent.is_err());
        assert!(!clean || body.len() < 200_000, "never a clean, complete-looking end");
        assert!(!clean, "the client sees a reset");
    }

    #[test]
    fn a_range_of_a_rangeable_body_is_a_206_with_its_content_range() {
        let got = exchange(&get_with("Range: bytes=2-4\r\n"), nar(b"0123456789"));
        assert!(got.starts_with("HTTP/1.1 206 Partial Content\r\n"), "{got}");
        for h in ["Content-Length: 3\r\n", "Content-Range: bytes 2-4/10\r\n", "Accept-Ranges: bytes\r\n", "ETag: \"t\"\r\n"] {
            assert!(got.contains(h), "{h:?} in {got}");
        }
        assert!(got.ends_with("\r\n\r\n234"), "{got}");
        let got = exchange(&get_with("Range: bytes=10-\r\n"), nar(b"0123456789"));
        assert!(got.starts_with("HTTP/1.1 416 Range Not Satisfiable\r\n") && got.contains("Content-Range: bytes */10\r\n"), "{got}");
    }

    #[test]
    fn a_body_with_a_content_encoding_is_never_announced_or_sent_as_ranges() {
        let encoded = nar(b"0123456789").with_header("Content-Encoding", "zstd");
        let got = exchange(&get_with("Range: bytes=2-4\r\n"), encoded);
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(!got.contains("Accept-Ranges") && !got.contains("Content-Range"), "{got}");
        assert!(got.ends_with("\r\n\r\n0123456789"), "{got}");
    }

    #[test]
    fn bodies_not_made_rangeable_ignore_range() {
        let plain = Response::new(200, "text/x-nix-narinfo", Body::Bytes(b"0123456789".to_vec()));
        let got = exchange(&get_with("Range: bytes=2-4\r\n"), plain);
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n") && !got.contains("Accept-Ranges"), "{got}");
    }

    #[test]
    fn a_download_failing_before_its_first_byte_is_a_502_that_says_why() {
        let (sent, got, clean) = send(FailsAfter { file: File::open("/dev/null").unwrap(), len: 10, ok: 0 });
        let sent = sent.unwrap();
        assert_eq!((sent.status, sent.replaced_because.as_deref()), (502, Some("upstream reset")));
        let got = String::from_utf8(got).unwrap();
        assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got}");
        assert!(got.ends_with("\r\n\r\nBad Gateway: upstream reset\n"), "{got}");
        assert!(clean);
    }

    #[test]
    fn a_download_failing_mid_body_resets_the_connection_after_a_200() {
        let (sent, got, clean) = send(FailsAfter { file: File::open("/dev/null").unwrap(), len: 10, ok: 4 });
        assert_eq!(sent, Err("upstream reset".to_string()));
        // A reset may discard what the client had not read yet, so only a prefix is certain.
        assert!(b"HTTP/1.1 200 OK\r\n".starts_with(&got[..got.len().min(17)]), "{got:?}");
        assert!(!got.ends_with(b"xxxxxxxxxx"), "{:?}", String::from_utf8_lossy(&got));
        assert!(!clean, "the client must see a reset, not a clean end");
    }

    #[test]
    fn a_transfer_is_judged_only_once_a_window_of_waiting_is_over() {
        let rule = MinRate::per_sec(16 << 10);
        let ms = std::time::Duration::from_millis;
        assert_eq!(verdict(0, ms(9_999), rule), Verdict::Open);
        assert_eq!(verdict(160 << 10, ms(10_000), rule), Verdict::Passed);
        assert_eq!(verdict((160 << 10) - 1, ms(10_000), rule), Verdict::TooSlow);
        // A call that ran past the window is judged against the window, not its overrun.
        assert_eq!(verdict(160 << 10, ms(60_000), rule), Verdict::Passed);
        assert_eq!(verdict(0, ms(1_000_000), MinRate::OFF), Verdict::Open);
    }

    #[test]
    fn a_drip_is_cut_off_after_one_window_and_a_fast_start_does_not_excuse_a_stall() {
        let s = std::time::Duration::from_secs;
        let mut drip = Pace::new(MinRate::per_sec(16 << 10));
        // 1 byte every 5 s: the second read ends the first window.
        assert!(drip.record(1, s(5)).is_ok());
        let slow = drip.record(1, s(5)).unwrap_err();
        assert_eq!((slow.bytes, slow.blocked), (2, s(10)));
        // Socket buffers filled at once, then 4 KiB/s: the first window passes, the next not.
        let mut reader = Pace::new(MinRate::per_sec(16 << 10));
        assert!(reader.record(4 << 20, s(1)).is_ok());
        assert!(reader.record(4 << 10, s(9)).is_ok());
        assert!(reader.record(4 << 10, s(5)).is_ok());
        assert!(reader.record(4 << 10, s(5)).is_err());
    }
}
