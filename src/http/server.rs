//! The connection machinery: one poll loop for accepting and reading request heads, and a
//! fixed pool of workers that answer complete requests.
//!
//! Why split it this way: a worker is the expensive resource (it may stream a NAR for minutes),
//! so it must only ever be given a request that is ready to answer. Connections that are idle
//! between requests, or still sending their headers (slowly, or never: slowloris), wait in the
//! poll loop, which costs a few hundred bytes each, until their deadline closes them.

use super::body::{part_for, render_small, write_response, Sent};
use super::range::Part;
use super::request::{parse_head, Parsed, Request, MAX_HEAD_BYTES};
use super::{Method, Response};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Answers requests; called from many worker threads at once.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: &Request, body: &mut dyn Read) -> Response;

    /// Answers `req` at once if that needs no waiting (a small file already on disk), from the
    /// poll loop itself; `None` sends it to a worker. Only small bodies (bytes, or files of
    /// at most 16 KiB) may be returned: the poll loop must never block on a big one.
    fn fast(&self, _req: &Request) -> Option<Response> {
        None
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub workers: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// Connections held open at most (idle, reading or being answered).
    pub max_connections: usize,
}

/// A connection waiting in the poll loop.
struct Waiting {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    deadline: Instant,
}

/// Work for a worker.
enum Job {
    /// A request to answer.
    Request {
        stream: TcpStream,
        req: Request,
        /// Bytes read past the head: the start of the body (or of a pipelined request).
        rest: Vec<u8>,
    },
    /// The rest of a response the poll loop could not send without waiting.
    Finish { stream: TcpStream, peer: SocketAddr, unsent: Vec<u8>, keep_alive: bool, rest: Vec<u8> },
}

struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

/// Runs the server on `listener` until the process ends.
pub fn serve(listener: TcpListener, config: ServerConfig, handler: Arc<dyn Handler>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let queue = Arc::new(Queue { jobs: Mutex::new(VecDeque::new()), ready: Condvar::new() });
    let (back_tx, back_rx) = mpsc::channel::<Back>();
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    wake_tx.set_nonblocking(true)?;
    let wake_tx = Arc::new(wake_tx);
    for i in 0..config.workers {
        let (queue, handler, back_tx, wake_tx) =
            (queue.clone(), handler.clone(), back_tx.clone(), wake_tx.clone());
        std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .stack_size(512 * 1024)
            .spawn(move || worker(&queue, &*handler, &back_tx, &wake_tx))?;
    }
    poll_loop(listener, &config, &queue, &*handler, &back_rx, wake_rx)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a worker gives back to the poll loop when it is done with a connection.
enum Back {
    /// Keep-alive: wait for the next request (with any bytes already read past this one).
    Again(TcpStream, SocketAddr, Vec<u8>),
    Closed,
}

fn poll_loop(
    listener: TcpListener,
    config: &ServerConfig,
    queue: &Queue,
    handler: &dyn Handler,
    back_rx: &mpsc::Receiver<Back>,
    mut wake_rx: UnixStream,
) -> io::Result<()> {
    let mut waiting: Vec<Waiting> = Vec::new();
    // Connections handed to workers and not yet back; counted against max_connections.
    let mut busy = 0usize;
    let mut accept_paused_until: Option<Instant> = None;
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        let now = Instant::now();
        let can_accept = waiting.len() + busy < config.max_connections
            && accept_paused_until.is_none_or(|t| now >= t);
        fds.clear();
        let pollfd = |fd, events| libc::pollfd { fd, events, revents: 0 };
        fds.push(pollfd(if can_accept { listener.as_raw_fd() } else { -1 }, libc::POLLIN));
        fds.push(pollfd(wake_rx.as_raw_fd(), libc::POLLIN));
        fds.extend(waiting.iter().map(|w| pollfd(w.stream.as_raw_fd(), libc::POLLIN)));
        let next_deadline = waiting.iter().map(|w| w.deadline).min();
        let timeout = next_deadline
            .map(|d| d.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_millis(if accept_paused_until.is_some() { 50 } else { 1000 }));
        // SAFETY: fds is a valid, initialised array of pollfd of the given length.
        let n = unsafe {
            libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout.as_millis() as libc::c_int + 1)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let now = Instant::now();
        // One flag per connection polled; connections added below were not polled.
        let readable: Vec<bool> = fds[2..].iter().map(|f| f.revents != 0).collect();

        if fds[1].revents != 0 {
            let mut sink = [0u8; 64];
            while matches!(wake_rx.read(&mut sink), Ok(n) if n > 0) {}
        }
        while let Ok(back) = back_rx.try_recv() {
            busy = busy.saturating_sub(1);
            if let Back::Again(stream, peer, rest) = back {
                // A connection that already sent part of its next head has the header
                // deadline; an idle one the keep-alive deadline.
                let wait = if rest.is_empty() { config.idle_timeout } else { config.header_timeout };
                waiting.push(Waiting { stream, peer, buf: rest, deadline: now + wait });
            }
        }

        let mut still = Vec::with_capacity(waiting.len());
        for (i, mut w) in waiting.drain(..).enumerate() {
            if readable.get(i) == Some(&true) && read_more(&mut w, config, now) {
                continue; // closed by the peer
            }
            if !w.buf.is_empty() {
                match dispatch(w, queue, handler, config, now) {
                    Dispatch::Keep(back) => w = back,
                    Dispatch::Queued => {
                        busy += 1;
                        continue;
                    }
                    Dispatch::Refused => continue,
                }
            }
            if now >= w.deadline {
                // An idle keep-alive connection just closes; a half-sent head gets a 408.
                if !w.buf.is_empty() {
                    log::info!("{} request head not finished within {:?}: 408", w.peer, config.header_timeout);
                    let _ = w.stream.write_all(
                        b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
                continue;
            }
            still.push(w);
        }
        waiting = still;

        if fds[0].revents != 0 {
            accept_paused_until = accept_all(&listener, &mut waiting, config, busy, now);
        }
    }
}

/// Accepts every pending connection. Returns a time until which accepting should pause:
/// when the process is out of descriptors, retrying at once would spin, and giving up (as
/// some servers do) would stop the service for good.
fn accept_all(
    listener: &TcpListener,
    waiting: &mut Vec<Waiting>,
    config: &ServerConfig,
    in_flight: usize,
    now: Instant,
) -> Option<Instant> {
    while waiting.len() + in_flight < config.max_connections {
        match listener.accept() {
            Ok((stream, peer)) => {
                // Timeouts are set once per connection: they only matter while a worker holds
                // it in blocking mode, and setting them per request would cost two syscalls.
                let ok = stream.set_nonblocking(true).is_ok()
                    && stream.set_read_timeout(Some(config.header_timeout)).is_ok()
                    && stream.set_write_timeout(Some(config.write_timeout)).is_ok();
                if !ok {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                waiting.push(Waiting { stream, peer, buf: Vec::new(), deadline: now + config.header_timeout });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("accepting a connection: {e}; pausing accepts for 100ms");
                return Some(now + Duration::from_millis(100));
            }
        }
    }
    None
}

/// Reads what a waiting connection sent. Returns true if the connection is finished (closed
/// by the peer, failed, or refused).
fn read_more(w: &mut Waiting, config: &ServerConfig, now: Instant) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match w.stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => {
                if w.buf.is_empty() {
                    // The first byte of a request starts its header deadline.
                    w.deadline = now + config.header_timeout;
                }
                w.buf.extend_from_slice(&chunk[..n]);
                // A short read emptied the socket: asking again would only return WouldBlock
                // (poll is level-triggered, so anything later is reported next round).
                if n < chunk.len() || w.buf.len() > MAX_HEAD_BYTES + 4096 {
                    return false; // dispatch refuses an oversized head with 431
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

enum Dispatch {
    /// Waiting for (more of) the next request.
    Keep(Waiting),
    Queued,
    Refused,
}

/// Answers what a connection holds: small hits right here, anything else by a worker;
/// refuses a bad head. Loops over pipelined requests that the poll loop can answer.
fn dispatch(mut w: Waiting, queue: &Queue, handler: &dyn Handler, config: &ServerConfig, now: Instant) -> Dispatch {
    loop {
        let (req, head_len) = match parse_head(&w.buf, w.peer) {
            Parsed::Partial => return Dispatch::Keep(w),
            Parsed::Invalid(status, why) => {
                log::info!("{} bad request: {why}: {status}", w.peer);
                let msg = format!(
                    "HTTP/1.1 {status} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    super::reason(status)
                );
                let _ = w.stream.write_all(msg.as_bytes());
                return Dispatch::Refused;
            }
            Parsed::Complete(req, head_len) => (req, head_len),
        };
        let rest = w.buf.split_off(head_len);
        let simple = req.content_length == 0 && !req.chunked;
        // A panic here would take down the poll loop and with it the server: a worker retries
        // the request instead, where a second panic costs only that request (a 500).
        let span = crate::otel::request_span(req.header("traceparent"));
        let answered = if simple {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.fast(&req))).unwrap_or_else(|_| {
                log::error!("{} {}: internal error (panic) in the fast path", req.method_text, req.target);
                None
            })
        } else {
            None
        };
        let Some(resp) = answered else {
            // Not answered here: the worker's span is the request's (this one is not sent).
            span.discard();
            if w.stream.set_nonblocking(false).is_err() {
                return Dispatch::Refused;
            }
            push(queue, Job::Request { stream: w.stream, req, rest });
            return Dispatch::Queued;
        };
        let keep_alive = req.keep_alive;
        let start = Instant::now();
        let status = resp.status;
        let note = resp.log_note();
        let otel_note = (resp.note, resp.upstream.clone());
        let body = if req.method == Method::Head { 0 } else { resp.body.len() };
        let bytes = match render_small(resp, req.method == Method::Head, keep_alive) {
            Ok(b) => b,
            Err(e) => {
                log::error!("{} {} {}: {e}", req.peer.ip(), req.method_text, req.target);
                return Dispatch::Refused;
            }
        };
        let sent = write_nonblocking(&mut w.stream, &bytes);
        log::info!(
            "{} {} {} {status} {body}B {:.1}ms {note}",
            req.peer.ip(), req.method_text, req.target, start.elapsed().as_secs_f64() * 1000.0
        );
        crate::otel::request_done(&span, &req.method_text, req.path(), req.peer.ip(), status, body, otel_note.0, otel_note.1.as_deref());
        drop(span);
        match sent {
            Err(_) => return Dispatch::Refused,
            Ok(n) if n < bytes.len() => {
                // The client's socket buffer is full: a worker waits for it (with the write
                // timeout), so this loop never does.
                if w.stream.set_nonblocking(false).is_err() {
                    return Dispatch::Refused;
                }
                let unsent = bytes[n..].to_vec();
                push(queue, Job::Finish { stream: w.stream, peer: w.peer, unsent, keep_alive, rest });
                return Dispatch::Queued;
            }
            Ok(_) if !keep_alive => return Dispatch::Refused,
            Ok(_) => {
                w.buf = rest;
                let wait = if w.buf.is_empty() { config.idle_timeout } else { config.header_timeout };
                w.deadline = now + wait;
                if w.buf.is_empty() {
                    return Dispatch::Keep(w);
                }
            }
        }
    }
}

fn push(queue: &Queue, job: Job) {
    lock(&queue.jobs).push_back(job);
    queue.ready.notify_one();
}

/// Writes as much of `bytes` as the socket takes without waiting.
fn write_nonblocking(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < bytes.len() {
        match stream.write(&bytes[sent..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed")),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// The request body: bytes already read past the head, then the socket, up to
/// Content-Length. Sends `100 Continue` first when the client asked for it.
struct BodyReader<'a> {
    rest: &'a [u8],
    stream: &'a mut TcpStream,
    remaining: u64,
    continue_pending: bool,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        if self.continue_pending {
            self.continue_pending = false;
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let max = (buf.len() as u64).min(self.remaining) as usize;
        let n = if !self.rest.is_empty() {
            let n = max.min(self.rest.len());
            buf[..n].copy_from_slice(&self.rest[..n]);
            self.rest = &self.rest[n..];
            n
        } else {
            let n = self.stream.read(&mut buf[..max])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request body ended early"));
            }
            n
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// How long a worker waits for the next request on a keep-alive connection before handing it
/// back to the poll loop. A client that sends its next request right after reading a response
/// (Nix fetching a closure, a benchmark) is then served without any hand-off, and an idle one
/// costs the worker only this long.
const LINGER: Duration = Duration::from_millis(2);

fn worker(
    queue: &Queue,
    handler: &dyn Handler,
    back_tx: &mpsc::Sender<Back>,
    wake_tx: &UnixStream,
) {
    loop {
        let job = {
            let mut jobs = lock(&queue.jobs);
            loop {
                if let Some(job) = jobs.pop_front() {
                    break job;
                }
                jobs = queue.ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
            }
        };
        let (mut stream, peer, mut next) = match job {
            Job::Request { stream, req, rest } => {
                let peer = req.peer;
                (stream, peer, Next::Ready(req, rest))
            }
            Job::Finish { mut stream, peer, unsent, keep_alive, rest } => {
                let next = match stream.write_all(&unsent) {
                    Ok(()) if keep_alive => next_request(&stream, rest, peer),
                    _ => Next::Closed,
                };
                (stream, peer, next)
            }
        };
        let back = loop {
            let (req, rest) = match next {
                Next::Ready(req, rest) => (req, rest),
                Next::Idle(buf) if stream.set_nonblocking(true).is_ok() => break Back::Again(stream, peer, buf),
                Next::Idle(_) | Next::Closed => break Back::Closed,
            };
            let Some(leftover) = answer(&mut stream, &req, rest, handler) else { break Back::Closed };
            next = next_request(&stream, leftover, peer);
        };
        // The poll loop counts this connection until it hears back, so always tell it.
        let _ = back_tx.send(back);
        let _ = (&*wake_tx).write(&[1]);
    }
}

/// Answers one request. Returns the bytes read past it if the connection may carry another.
fn answer(stream: &mut TcpStream, req: &Request, rest: Vec<u8>, handler: &dyn Handler) -> Option<Vec<u8>> {
    let start = Instant::now();
    let span = crate::otel::request_span(req.header("traceparent"));
    let (resp, body_left, leftover) = if req.chunked {
        (Response::text(411, "chunked request bodies are not supported; send Content-Length\n"), 1, Vec::new())
    } else {
        let body_in_rest = (req.content_length.min(rest.len() as u64)) as usize;
        let mut body = BodyReader {
            rest: &rest[..body_in_rest],
            stream: &mut *stream,
            remaining: req.content_length,
            continue_pending: req.expect_continue,
        };
        // A bug in one handler must cost one request (a 500), not a worker or the process.
        let resp = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.handle(req, &mut body)))
            .unwrap_or_else(|_| {
                log::error!("{} {}: internal error (panic); answered 500", req.method_text, req.target);
                Response::text(500, "Internal Server Error\n")
            });
        (resp, body.remaining, rest[body_in_rest..].to_vec())
    };
    // A body the handler did not read would be taken for the next request: close instead.
    let keep_alive = req.keep_alive && body_left == 0;
    let mut resp = resp;
    let part = part_for(req, &resp);
    let status = match part {
        Part::Whole => resp.status,
        Part::Range { .. } => 206,
        Part::Unsatisfiable => 416,
    };
    let note = resp.log_note();
    let otel_note = (resp.note, resp.upstream.clone());
    let on_sent = resp.on_sent.take();
    let planned = if req.method == Method::Head { 0 } else { part.span(resp.body.len()).1 };
    let result = write_response(stream, resp, part, req.method == Method::Head, keep_alive);
    if let Some(on_sent) = on_sent {
        // An aborted transfer counts as what it was meant to be; the log line says it broke.
        let aborted = Sent { status, bytes: planned, replaced_because: None };
        on_sent(result.as_ref().unwrap_or(&aborted));
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    match &result {
        Ok(Sent { status, bytes, replaced_because: None }) => {
            log::info!("{} {} {} {status} {bytes}B {ms:.1}ms {note}", req.peer.ip(), req.method_text, req.target)
        }
        Ok(Sent { status, bytes, replaced_because: Some(why) }) => log::info!(
            "{} {} {} {status} {bytes}B {ms:.1}ms {note}: {why}",
            req.peer.ip(), req.method_text, req.target
        ),
        Err(e) => log::info!(
            "{} {} {} {status} aborted after {ms:.1}ms {note}: {e}",
            req.peer.ip(), req.method_text, req.target
        ),
    }
    let (sent_status, sent_bytes) = result.as_ref().map_or((status, 0), |s| (s.status, s.bytes));
    crate::otel::request_done(&span, &req.method_text, req.path(), req.peer.ip(), sent_status, sent_bytes, otel_note.0, otel_note.1.as_deref());
    if let Err(e) = &result {
        span.fail(format!("aborted: {e}"));
    }
    (result.is_ok() && keep_alive).then_some(leftover)
}

enum Next {
    /// The next request is here, with the bytes past its head.
    Ready(Request, Vec<u8>),
    /// Nothing complete yet: back to the poll loop, with what was read so far.
    Idle(Vec<u8>),
    Closed,
}

/// Looks for the next request on a keep-alive connection, waiting at most [`LINGER`].
fn next_request(stream: &TcpStream, mut buf: Vec<u8>, peer: SocketAddr) -> Next {
    if buf.is_empty() {
        let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut fd, 1, LINGER.as_millis() as libc::c_int) };
        if ready <= 0 {
            return Next::Idle(buf);
        }
        let mut chunk = [0u8; 4096];
        // SAFETY: reads into a live buffer of the given length; MSG_DONTWAIT keeps the
        // blocking socket from waiting.
        let n = unsafe {
            libc::recv(stream.as_raw_fd(), chunk.as_mut_ptr() as *mut libc::c_void, chunk.len(), libc::MSG_DONTWAIT)
        };
        match n {
            0 => return Next::Closed,
            n if n < 0 => {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock { Next::Idle(buf) } else { Next::Closed };
            }
            n => buf.extend_from_slice(&chunk[..n as usize]),
        }
    }
    match parse_head(&buf, peer) {
        Parsed::Complete(req, head_len) => {
            let rest = buf.split_off(head_len);
            Next::Ready(req, rest)
        }
        // Partial heads and bad ones go back to the poll loop, which owns their deadline and
        // answers malformed requests.
        _ => Next::Idle(buf),
    }
}
