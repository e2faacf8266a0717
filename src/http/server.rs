//! The connection machinery: one poll loop for accepting and reading request heads, and a
//! fixed pool of workers that answer complete requests.
//!
//! Why split it this way: a worker is the expensive resource (it may stream a NAR for minutes),
//! so it must only ever be given a request that is ready to answer. Connections that are idle
//! between requests, or still sending their headers (slowly, or never: slowloris), wait in the
//! poll loop, which costs a few hundred bytes each, until their deadline closes them.
//!
//! Sharing, so that no one peer takes the server (issue 15):
//! - two pools: requests that must ask an upstream (narinfo and NAR misses, [`Lane::Upstream`])
//!   go to their own bounded pool, so a slow or dripping upstream, or a flood of misses, never
//!   takes the workers that serve hits from disk ([`Lane::Local`]);
//! - within a pool, the next job is the oldest one of the client address that has the fewest
//!   jobs running ([`fair_pick`]), so one host with many connections gets its share, not all;
//! - a worker keeps a keep-alive connection for the next request only while no other job waits,
//!   and for at most [`MAX_REQUESTS_PER_HOLD`] requests;
//! - when every connection slot is taken, a newcomer takes the slot of a waiting connection of
//!   the address holding the most ([`make_room`]), so idle sockets of one host cannot lock
//!   out the others;
//! - request bodies and responses have a minimum rate (body.rs, [`MinRate`]).

use super::body::{part_for, render_small, write_response, MinRate, Pace, Sent};
use super::range::Part;
use super::request::{parse_head, Parsed, Request, MAX_HEAD_BYTES};
use super::{Method, Response};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
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

    /// Which pool answers `req`: [`Lane::Upstream`] for what will have to ask an upstream.
    /// Called from the poll loop, so it must not wait (a `stat` at most).
    fn lane(&self, _req: &Request) -> Lane {
        Lane::Local
    }
}

/// Which worker pool a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Answered from this machine: hits, uploads, status pages.
    Local,
    /// Needs an upstream (a miss): its time is set by someone else's server.
    Upstream,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub workers: usize,
    /// Workers for [`Lane::Upstream`] requests, apart from `workers`.
    pub upstream_workers: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// Connections held open at most (idle, reading or being answered).
    pub max_connections: usize,
    /// The slowest a response may be read, and a request body sent, before the client is cut off.
    pub min_send_rate: MinRate,
    pub min_receive_rate: MinRate,
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

impl Job {
    fn peer(&self) -> SocketAddr {
        match self {
            Job::Request { req, .. } => req.peer,
            Job::Finish { peer, .. } => *peer,
        }
    }
}

/// One worker pool's queue, and how many jobs of each client address its workers run.
struct Pool {
    state: Mutex<PoolState>,
    ready: Condvar,
    /// How many of this pool's workers one client address may hold at once ([`per_host_cap`]).
    cap: usize,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    running: HashMap<IpAddr, usize>,
}

impl Pool {
    fn new(workers: usize) -> Pool {
        Pool { state: Mutex::new(PoolState::default()), ready: Condvar::new(), cap: per_host_cap(workers) }
    }

    fn push(&self, job: Job) {
        lock(&self.state).jobs.push_back(job);
        self.ready.notify_one();
    }

    /// Waits for a job and takes the fairest one ([`fair_pick`]), counting it as running.
    fn take(&self) -> Job {
        let mut st = lock(&self.state);
        loop {
            let picked = {
                let PoolState { jobs, running } = &*st;
                fair_pick(jobs.iter().map(|j| j.peer().ip()), running, self.cap)
            };
            if let Some(job) = picked.and_then(|i| st.jobs.remove(i)) {
                *st.running.entry(job.peer().ip()).or_default() += 1;
                return job;
            }
            st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self, ip: IpAddr) {
        let mut st = lock(&self.state);
        if let Some(n) = st.running.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                st.running.remove(&ip);
            }
        }
        drop(st);
        // A job of this address may have waited for its share to go down.
        self.ready.notify_one();
    }

    fn others_waiting(&self) -> bool {
        !lock(&self.state).jobs.is_empty()
    }
}

/// Which queued job a free worker takes: the oldest of those whose client address has the
/// fewest jobs running, skipping addresses that already hold `cap` workers. With one busy
/// host and one other, the other's request is next even if the busy host queued a hundred
/// before it; among equals it is first come, first served. Stops looking at the first
/// address with nothing running (none can be fairer).
fn fair_pick(queued: impl Iterator<Item = IpAddr>, running: &HashMap<IpAddr, usize>, cap: usize) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, ip) in queued.enumerate() {
        let n = running.get(&ip).copied().unwrap_or(0);
        if n >= cap {
            continue;
        }
        if best.is_none_or(|(_, b)| n < b) {
            best = Some((i, n));
            if n == 0 {
                break;
            }
        }
    }
    best.map(|(i, _)| i)
}

/// How many workers of a pool of `workers` one client address may hold: all but a quarter,
/// kept for the other addresses (so 80 slow readers from one host leave 16 of 64 workers to
/// everyone else until the minimum send rate cuts them off). Pools under 4 keep none: there,
/// a reserve would halve what a lone client gets.
pub fn per_host_cap(workers: usize) -> usize {
    if workers < 4 {
        workers.max(1)
    } else {
        workers - workers / 4
    }
}

/// The two pools.
struct Pools {
    local: Pool,
    upstream: Pool,
}

impl Pools {
    fn of(&self, lane: Lane) -> &Pool {
        match lane {
            Lane::Local => &self.local,
            Lane::Upstream => &self.upstream,
        }
    }
}

/// Runs the server on `listener` until the process ends.
pub fn serve(listener: TcpListener, config: ServerConfig, handler: Arc<dyn Handler>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let pools = Arc::new(Pools { local: Pool::new(config.workers), upstream: Pool::new(config.upstream_workers) });
    let (back_tx, back_rx) = mpsc::channel::<Back>();
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    wake_rx.set_nonblocking(true)?;
    wake_tx.set_nonblocking(true)?;
    let wake_tx = Arc::new(wake_tx);
    let config = Arc::new(config);
    for (lane, count, name) in [(Lane::Local, config.workers, "worker"), (Lane::Upstream, config.upstream_workers, "upstream-worker")] {
        for i in 0..count {
            let (pools, handler, back_tx, wake_tx, config) =
                (pools.clone(), handler.clone(), back_tx.clone(), wake_tx.clone(), config.clone());
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(512 * 1024)
                .spawn(move || worker(lane, &pools, &*handler, &config, &back_tx, &wake_tx))?;
        }
    }
    poll_loop(listener, &config, &pools, &*handler, &back_rx, wake_rx)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a worker gives back to the poll loop when it is done with a connection.
enum Back {
    /// Keep-alive: wait for the next request (with any bytes already read past this one).
    Again(TcpStream, SocketAddr, Vec<u8>),
    Closed(IpAddr),
}

/// Open connections per client address (waiting, queued or with a worker).
#[derive(Default)]
struct PerAddress(HashMap<IpAddr, usize>);

impl PerAddress {
    fn opened(&mut self, ip: IpAddr) {
        *self.0.entry(ip).or_default() += 1;
    }
    fn closed(&mut self, ip: IpAddr) {
        if let Some(n) = self.0.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&ip);
            }
        }
    }
    fn count(&self, ip: IpAddr) -> usize {
        self.0.get(&ip).copied().unwrap_or(0)
    }
}

/// What to do with a connection that arrives when every slot is taken.
#[derive(Debug, PartialEq, Eq)]
enum Room {
    /// Close a waiting (idle, or still sending its head) connection of this address.
    Evict(IpAddr),
    /// Refuse the newcomer: no address that could give up a slot holds more than it would.
    Refuse,
}

/// The fair choice when full: the address that holds the most connections among those with one
/// waiting in the poll loop gives up its oldest, if it holds at least as many as the newcomer
/// would with this one. So 16 idle sockets of one host (the whole cap under `ulimit -n 64`)
/// make room for a second host, and a host that reconnects over and over only replaces its
/// own connections. Connections a worker is answering are never closed for room.
fn make_room(newcomer: IpAddr, counts: &PerAddress, with_waiting: &[IpAddr]) -> Room {
    let mine = counts.count(newcomer);
    let heaviest = with_waiting.iter().map(|&ip| (ip, counts.count(ip))).max_by_key(|&(_, n)| n);
    match heaviest {
        Some((ip, n)) if n > mine => Room::Evict(ip),
        _ if with_waiting.contains(&newcomer) => Room::Evict(newcomer),
        _ => Room::Refuse,
    }
}

fn poll_loop(
    listener: TcpListener,
    config: &ServerConfig,
    pools: &Pools,
    handler: &dyn Handler,
    back_rx: &mpsc::Receiver<Back>,
    mut wake_rx: UnixStream,
) -> io::Result<()> {
    let mut waiting: Vec<Waiting> = Vec::new();
    // Connections handed to workers and not yet back; counted against max_connections.
    let mut busy = 0usize;
    let mut per_address = PerAddress::default();
    let mut accept_paused_until: Option<Instant> = None;
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        let now = Instant::now();
        // When full, accepting goes on while some waiting connection could give up its slot.
        let can_accept = (waiting.len() + busy < config.max_connections || !waiting.is_empty())
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
            match back {
                Back::Again(stream, peer, rest) => {
                    // A connection that already sent part of its next head has the header
                    // deadline; an idle one the keep-alive deadline.
                    let wait = if rest.is_empty() { config.idle_timeout } else { config.header_timeout };
                    waiting.push(Waiting { stream, peer, buf: rest, deadline: now + wait });
                }
                Back::Closed(ip) => per_address.closed(ip),
            }
        }

        let mut still = Vec::with_capacity(waiting.len());
        for (i, mut w) in waiting.drain(..).enumerate() {
            if readable.get(i) == Some(&true) && read_more(&mut w, config, now) {
                per_address.closed(w.peer.ip());
                continue; // closed by the peer
            }
            if !w.buf.is_empty() {
                let ip = w.peer.ip();
                match dispatch(w, pools, handler, config, now) {
                    Dispatch::Keep(back) => w = back,
                    Dispatch::Queued => {
                        busy += 1;
                        continue;
                    }
                    Dispatch::Refused => {
                        per_address.closed(ip);
                        continue;
                    }
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
                per_address.closed(w.peer.ip());
                continue;
            }
            still.push(w);
        }
        waiting = still;

        if fds[0].revents != 0 {
            accept_paused_until = accept_all(&listener, &mut waiting, &mut per_address, config, busy, now);
        }
    }
}

/// Accepts every pending connection. Returns a time until which accepting should pause:
/// when the process is out of descriptors, retrying at once would spin, and giving up (as
/// some servers do) would stop the service for good.
///
/// Past `max_connections` a newcomer is still accepted (the cap leaves descriptors to spare)
/// and [`make_room`] says whose waiting connection it replaces, or that it is refused (503).
fn accept_all(
    listener: &TcpListener,
    waiting: &mut Vec<Waiting>,
    per_address: &mut PerAddress,
    config: &ServerConfig,
    in_flight: usize,
    now: Instant,
) -> Option<Instant> {
    loop {
        let full = waiting.len() + in_flight >= config.max_connections;
        if full && waiting.is_empty() {
            return None;
        }
        match listener.accept() {
            Ok((mut stream, peer)) => {
                if full {
                    let with_waiting: Vec<IpAddr> = waiting.iter().map(|w| w.peer.ip()).collect();
                    match make_room(peer.ip(), per_address, &with_waiting) {
                        Room::Evict(ip) => {
                            if let Some(at) = waiting.iter().position(|w| w.peer.ip() == ip) {
                                let old = waiting.remove(at);
                                log::info!(
                                    "{ip}: closed a waiting connection ({} open, cap {}) to make room for {}",
                                    per_address.count(ip), config.max_connections, peer.ip()
                                );
                                per_address.closed(ip);
                                drop(old);
                            }
                        }
                        Room::Refuse => {
                            log::info!(
                                "{} refused: all {} connections taken, none waiting from a host with more: 503",
                                peer.ip(), config.max_connections
                            );
                            let _ = stream.set_nonblocking(true);
                            let _ = stream.write_all(
                                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 2\r\nConnection: close\r\n\r\n",
                            );
                            continue;
                        }
                    }
                }
                // Timeouts are set once per connection: they only matter while a worker holds
                // it in blocking mode, and setting them per request would cost two syscalls.
                // A minimum send rate is checked after each send returns, so no send may
                // block longer than the window it is judged over.
                let write_timeout = match config.min_send_rate.bytes_per_sec {
                    0 => config.write_timeout,
                    _ => config.write_timeout.min(config.min_send_rate.window),
                };
                let ok = stream.set_nonblocking(true).is_ok()
                    && stream.set_read_timeout(Some(config.header_timeout)).is_ok()
                    && stream.set_write_timeout(Some(write_timeout)).is_ok();
                if !ok {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                per_address.opened(peer.ip());
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
fn dispatch(mut w: Waiting, pools: &Pools, handler: &dyn Handler, config: &ServerConfig, now: Instant) -> Dispatch {
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
            let lane = handler.lane(&req);
            pools.of(lane).push(Job::Request { stream: w.stream, req, rest });
            return Dispatch::Queued;
        };
        let keep_alive = req.keep_alive;
        let start = Instant::now();
        let mut resp = resp;
        let status = resp.status;
        let note = resp.log_note();
        let otel_note = (resp.note, resp.upstream.clone());
        let body = if req.method == Method::Head { 0 } else { resp.body.len() };
        if let Some(on_sent) = resp.on_sent.take() {
            // Counted as sent: if the socket cannot take it all now, a worker finishes it.
            on_sent(&Sent { status, bytes: body, replaced_because: None });
        }
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
                pools.local.push(Job::Finish { stream: w.stream, peer: w.peer, unsent, keep_alive, rest });
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
/// Content-Length. Sends `100 Continue` first when the client asked for it. A body that
/// arrives slower than `--server-min-receive-rate` ends in a `TimedOut` error (the handler
/// answers it as a failed upload, and the connection is closed).
struct BodyReader<'a> {
    rest: &'a [u8],
    stream: &'a mut TcpStream,
    remaining: u64,
    continue_pending: bool,
    pace: Pace,
    req: &'a Request,
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
            let start = Instant::now();
            let got = self.stream.read(&mut buf[..max]);
            let n = *got.as_ref().unwrap_or(&0);
            if let Err(slow) = self.pace.record(n as u64, start.elapsed()) {
                let r = self.req;
                log::info!("{} {} {}: request body dropped: {slow}", r.peer.ip(), r.method_text, r.target);
                return Err(io::Error::new(io::ErrorKind::TimedOut, slow));
            }
            let n = got?;
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
/// costs the worker only this long. Only while no other job waits for a worker, and at most
/// [`MAX_REQUESTS_PER_HOLD`] requests in a row: with "whenever the next request comes within
/// 2 ms" alone, 200 busy connections on 64 workers left 136 of them queued behind the 64 that
/// kept their worker (p99 of a sub-millisecond hit 1.66 s).
const LINGER: Duration = Duration::from_millis(2);

/// See [`LINGER`].
pub const MAX_REQUESTS_PER_HOLD: usize = 16;

fn worker(
    lane: Lane,
    pools: &Pools,
    handler: &dyn Handler,
    config: &ServerConfig,
    back_tx: &mpsc::Sender<Back>,
    wake_tx: &UnixStream,
) {
    let pool = pools.of(lane);
    loop {
        let job = pool.take();
        let ip = job.peer().ip();
        let back = run(job, lane, pools, handler, config);
        pool.done(ip);
        if let Some(back) = back {
            // The poll loop counts this connection until it hears back, so always tell it.
            let _ = back_tx.send(back);
            let _ = (&*wake_tx).write(&[1]);
        }
    }
}

/// Answers a job and the requests that follow it on its connection while this worker may
/// keep it. `None` when the connection went to the other pool (its next request is for it).
fn run(job: Job, lane: Lane, pools: &Pools, handler: &dyn Handler, config: &ServerConfig) -> Option<Back> {
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
    let mut served = 0;
    loop {
        let (req, rest) = match next {
            Next::Ready(req, rest) => (req, rest),
            Next::Idle(buf) if stream.set_nonblocking(true).is_ok() => return Some(Back::Again(stream, peer, buf)),
            Next::Idle(_) | Next::Closed => return Some(Back::Closed(peer.ip())),
        };
        if served > 0 {
            let wanted = handler.lane(&req);
            if wanted != lane {
                pools.of(wanted).push(Job::Request { stream, req, rest });
                return None;
            }
        }
        let Some(leftover) = answer(&mut stream, &req, rest, handler, config) else {
            return Some(Back::Closed(peer.ip()));
        };
        served += 1;
        // Upstream workers never linger: the next request is most likely a hit, for the
        // other pool, and the poll loop sorts it there.
        let linger = lane == Lane::Local && served < MAX_REQUESTS_PER_HOLD && !pools.local.others_waiting();
        next = if linger { next_request(&stream, leftover, peer) } else { Next::Idle(leftover) };
    }
}

/// Answers one request. Returns the bytes read past it if the connection may carry another.
fn answer(stream: &mut TcpStream, req: &Request, rest: Vec<u8>, handler: &dyn Handler, config: &ServerConfig) -> Option<Vec<u8>> {
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
            pace: Pace::new(config.min_receive_rate),
            req,
        };
        let _answering = super::body::Answering::start(body.stream);
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
    let result = write_response(stream, resp, part, req.method == Method::Head, keep_alive, config.min_send_rate);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_free_worker_takes_the_oldest_job_of_the_least_served_address() {
        let running: HashMap<IpAddr, usize> = [(ip(1), 3), (ip(2), 1)].into_iter().collect();
        // Host 1 queued first and most, but runs the most: host 3 (nothing running) goes first.
        assert_eq!(fair_pick([ip(1), ip(1), ip(2), ip(3), ip(3)].into_iter(), &running, 64), Some(3));
        assert_eq!(fair_pick([ip(1), ip(2), ip(1)].into_iter(), &running, 64), Some(1));
        // Among equals, first come first served.
        assert_eq!(fair_pick([ip(4), ip(5)].into_iter(), &running, 64), Some(0));
        assert_eq!(fair_pick(std::iter::empty(), &running, 64), None);
    }

    #[test]
    fn an_address_at_its_share_of_workers_waits_while_others_are_served() {
        let running: HashMap<IpAddr, usize> = [(ip(1), 48)].into_iter().collect();
        assert_eq!(fair_pick([ip(1), ip(1)].into_iter(), &running, 48), None);
        assert_eq!(fair_pick([ip(1), ip(2)].into_iter(), &running, 48), Some(1));
        assert_eq!((per_host_cap(64), per_host_cap(4), per_host_cap(2), per_host_cap(1)), (48, 3, 2, 1));
    }

    fn counts(pairs: &[(IpAddr, usize)]) -> PerAddress {
        PerAddress(pairs.iter().copied().collect())
    }

    #[test]
    fn a_host_holding_every_slot_gives_one_up_to_another_host() {
        let c = counts(&[(ip(1), 16)]);
        assert_eq!(make_room(ip(2), &c, &[ip(1); 16]), Room::Evict(ip(1)));
    }

    #[test]
    fn a_host_that_reconnects_when_full_replaces_its_own_connections() {
        let c = counts(&[(ip(1), 15), (ip(2), 1)]);
        assert_eq!(make_room(ip(1), &c, &[ip(1), ip(2)]), Room::Evict(ip(1)));
        // Equal shares: the newcomer's own waiting connection, not the other host's.
        let c = counts(&[(ip(1), 8), (ip(2), 8)]);
        assert_eq!(make_room(ip(2), &c, &[ip(1), ip(2)]), Room::Evict(ip(2)));
    }

    #[test]
    fn a_newcomer_is_refused_rather_than_taking_a_smaller_hosts_slot() {
        // Host 1's connections are all with workers; host 2 holds fewer than host 3 would.
        let c = counts(&[(ip(1), 14), (ip(2), 1), (ip(3), 1)]);
        assert_eq!(make_room(ip(3), &c, &[ip(2)]), Room::Refuse);
        assert_eq!(make_room(ip(4), &c, &[]), Room::Refuse);
    }
}
