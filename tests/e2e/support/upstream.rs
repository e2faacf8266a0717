//! The test upstream: a static file server on 127.0.0.1 ([`Upstream`]) that serves a
//! fixture cache and misbehaves on demand ([`Mode`], for the requests [`Target`] selects):
//! errors, hangs, resets and clean closes mid-body, corrupted, throttled or dripping bodies,
//! zstd content encoding, redirects (to its own `/mirror/` path or to another port), and
//! it can require an `Authorization` header ([`Upstream::require_authorization`]). It answers
//! `Range: bytes=a-b` / `a-` with a 206 (misbehaving on the part it sends), unless told to
//! ignore ranges. It counts what it was asked for and what it sent, and can be stopped and
//! restarted on its port. [`TlsFront`] puts HTTPS in front of it.

use super::dirs::TempDir;
use super::fixture::{Compression, Fixture};
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};


/// What the upstream does with a request (changeable while it runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Serve files: 200 with Content-Length, 404 when missing.
    Normal,
    /// Answer every request with 500.
    Status500,
    /// Accept, read the request, never answer (until stop()/drop).
    Hang,
    /// Send headers and half the body, then reset the connection (RST).
    ResetMidBody,
    /// Send headers and half the body, then close cleanly (FIN).
    CloseMidBody,
    /// Flip one byte in the middle of every `.nar*` body.
    CorruptByte,
    /// Throttle bodies to this many bytes per second.
    Slow(u64),
    /// Send headers and half the body, then go silent with the connection open.
    StallMidBody,
    /// Send bodies compressed with zstd and `Content-Encoding: zstd`, as harmonia does.
    ZstdEncoded,
    /// ZstdEncoded, and reset half-way through the encoded body.
    ZstdEncodedResetMidBody,
    /// Like ResetMidBody for the first request of each path; later ones are served normally
    /// (a link that drops once).
    ResetOnce,
    /// Answer `302 Location: /mirror<path>` (on its own origin; `/mirror/...` is served as
    /// `...`).
    RedirectSameOrigin,
    /// Answer `302 Location: http://127.0.0.1:<port><path>`: another origin.
    RedirectTo(u16),
    /// Send the head at once, then the body one byte per interval: never idle long enough
    /// for an idle timeout, and never done. When the other end closes, that is recorded
    /// ([`Upstream::drip_cut`]).
    Drip(Duration),
}

/// Which requests the misbehaviour applies to; the others are served normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    All,
    /// `/nar/...` requests only.
    Nar,
    /// `*.narinfo` requests only.
    Narinfo,
}

impl Target {
    fn matches(self, path: &str) -> bool {
        match self {
            Target::All => true,
            Target::Nar => path.starts_with("/nar/"),
            Target::Narinfo => path.ends_with(".narinfo"),
        }
    }
}

struct UpstreamState {
    root: PathBuf,
    mode: Mutex<(Mode, Target)>,
    hits: Mutex<HashMap<String, u64>>,
    /// Body bytes written to the socket, per path (all requests for it together).
    sent: Mutex<HashMap<String, u64>>,
    requests: Mutex<Vec<String>>,
    /// The header lines of each request, in the order of `requests`.
    headers: Mutex<Vec<Vec<(String, String)>>>,
    /// The `Authorization` value every request must carry (else 401), if any.
    authorization: Mutex<Option<String>>,
    /// Bumped by stop(): connection threads of older generations give up.
    generation: AtomicU64,
    stopped: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Paths already reset once (Mode::ResetOnce).
    reset_once: Mutex<std::collections::HashSet<String>>,
    /// Whether Range requests get a 206 (else the whole file, 200, as if ranges were unknown).
    ranges: AtomicBool,
    /// For each path, when a dripping body's reader closed the connection (the last time).
    drip_cut: Mutex<HashMap<String, Instant>>,
    /// Dripping bodies being sent now.
    dripping: AtomicU64,
}

pub struct Upstream {
    state: Arc<UpstreamState>,
    port: u16,
    accept: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Serves the files under `root` on 127.0.0.1 (a free port).
    pub fn serve_dir(root: impl Into<PathBuf>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(UpstreamState {
            root: root.into(),
            mode: Mutex::new((Mode::Normal, Target::All)),
            hits: Mutex::new(HashMap::new()),
            sent: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            headers: Mutex::new(Vec::new()),
            authorization: Mutex::new(None),
            generation: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            reset_once: Mutex::new(std::collections::HashSet::new()),
            ranges: AtomicBool::new(true),
            drip_cut: Mutex::new(HashMap::new()),
            dripping: AtomicU64::new(0),
        });
        let mut u = Upstream {
            state,
            port,
            accept: None,
        };
        u.spawn_accept(listener);
        u
    }

    /// Serves one of the fixture's caches.
    pub fn for_cache(fx: &Fixture, c: Compression) -> Upstream {
        Upstream::serve_dir(fx.cache_dir(c))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Misbehave on every request.
    pub fn set_mode(&self, m: Mode) {
        *self.state.mode.lock().unwrap() = (m, Target::All);
    }

    /// Misbehave only on the requests `t` selects.
    pub fn set_mode_for(&self, m: Mode, t: Target) {
        *self.state.mode.lock().unwrap() = (m, t);
    }

    /// Whether Range requests are answered with 206 (the default) or ignored (200, whole file).
    pub fn set_ranges(&self, on: bool) {
        self.state.ranges.store(on, Ordering::SeqCst);
    }

    /// The `Range` header of every request for this exact path, in arrival order (None for a
    /// request without one).
    pub fn ranges_asked(&self, path: &str) -> Vec<Option<String>> {
        self.request_header("Range")
            .into_iter()
            .filter(|(r, _)| r.split_once(' ').is_some_and(|(_, p)| p == path))
            .map(|(_, v)| v)
            .collect()
    }

    /// Every request must carry `Authorization: <value>` (e.g. `Basic dXNlcjpwdw==`), else
    /// it is answered 401 with `WWW-Authenticate: Basic realm="test"`. `None` lifts it.
    pub fn require_authorization(&self, value: Option<&str>) {
        *self.state.authorization.lock().unwrap() = value.map(str::to_string);
    }

    /// Requests received for this exact path (query string excluded).
    pub fn hits(&self, path: &str) -> u64 {
        *self.state.hits.lock().unwrap().get(path).unwrap_or(&0)
    }

    pub fn total_hits(&self) -> u64 {
        self.state.hits.lock().unwrap().values().sum()
    }

    /// Requests whose path satisfies `pred`.
    pub fn hits_where(&self, pred: impl Fn(&str) -> bool) -> u64 {
        self.state
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(_, v)| v)
            .sum()
    }

    /// "METHOD /path" for every request, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// For every request, in arrival order: "METHOD /path" and its header `name`
    /// (case-insensitive), if it had one. What a client asked for, e.g. Accept-Encoding.
    pub fn request_header(&self, name: &str) -> Vec<(String, Option<String>)> {
        let requests = self.state.requests.lock().unwrap().clone();
        let headers = self.state.headers.lock().unwrap();
        requests
            .into_iter()
            .zip(headers.iter())
            .map(|(r, h)| {
                let v = h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
                (r, v.map(|(_, v)| v.clone()))
            })
            .collect()
    }

    /// Body bytes written so far for this exact path, over all its requests.
    /// Updated as each write is handed to the socket (before it, for whole and Slow bodies, so
    /// that what ncps has received is always counted), so while a Slow body is being sent it
    /// counts up.
    pub fn bytes_sent(&self, path: &str) -> u64 {
        *self.state.sent.lock().unwrap().get(path).unwrap_or(&0)
    }

    /// When ncps closed the connection of the last dripping body of this path (`Mode::Drip`).
    pub fn drip_cut(&self, path: &str) -> Option<Instant> {
        self.state.drip_cut.lock().unwrap().get(path).copied()
    }

    /// Dripping bodies whose connection is still open.
    pub fn dripping(&self) -> u64 {
        self.state.dripping.load(Ordering::SeqCst)
    }

    pub fn reset_hits(&self) {
        self.state.hits.lock().unwrap().clear();
        self.state.sent.lock().unwrap().clear();
        self.state.requests.lock().unwrap().clear();
        self.state.headers.lock().unwrap().clear();
    }

    /// Closes the listening socket (connections are then refused) and drops
    /// every open connection, including hanging ones.
    pub fn stop(&mut self) {
        if self.state.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.state.generation.fetch_add(1, Ordering::SeqCst);
        // Wake the accept loop so it drops the listener.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for (_, c) in self.state.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        if !self.state.stopped.load(Ordering::SeqCst) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("upstream restart on port {}: {e}", self.port),
            }
        };
        self.state.stopped.store(false, Ordering::SeqCst);
        self.spawn_accept(listener);
    }

    fn spawn_accept(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        let generation = state.generation.load(Ordering::SeqCst);
        self.accept = Some(thread::spawn(move || {
            for conn in listener.incoming() {
                if state.generation.load(Ordering::SeqCst) != generation {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let id = state.next_conn.fetch_add(1, Ordering::SeqCst);
                if let Ok(c) = conn.try_clone() {
                    state.conns.lock().unwrap().insert(id, c);
                }
                let st = state.clone();
                thread::spawn(move || {
                    let _ = handle_upstream_conn(&st, conn, generation);
                    st.conns.lock().unwrap().remove(&id);
                });
            }
        }));
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handle_upstream_conn(st: &UpstreamState, mut s: TcpStream, generation: u64) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    // Read the request head.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 64 * 1024 {
            return Ok(());
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let path = target.split('?').next().unwrap_or("/").to_string();

    *st.hits.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let range = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("range")).map(|(_, v)| v.clone());
    let authorized = match &*st.authorization.lock().unwrap() {
        None => true,
        Some(want) => headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v == want),
    };
    // Both under one lock order (requests, then headers), so request_header() pairs them.
    {
        let mut requests = st.requests.lock().unwrap();
        requests.push(format!("{method} {path}"));
        st.headers.lock().unwrap().push(headers);
    }
    if !authorized {
        let h = "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"\r\n\
                 Content-Length: 13\r\nConnection: close\r\n\r\nunauthorized\n";
        s.write_all(h.as_bytes())?;
        return s.flush();
    }

    let (mode, tgt) = *st.mode.lock().unwrap();
    let mode = if tgt.matches(&path) {
        mode
    } else {
        Mode::Normal
    };
    let mode = match mode {
        Mode::ResetOnce if st.reset_once.lock().unwrap().insert(path.clone()) => Mode::ResetMidBody,
        Mode::ResetOnce => Mode::Normal,
        m => m,
    };

    match mode {
        Mode::Hang => {
            while st.generation.load(Ordering::SeqCst) == generation {
                thread::sleep(Duration::from_millis(50));
            }
            return Ok(());
        }
        Mode::Status500 => {
            return respond(
                &mut s,
                500,
                "Internal Server Error",
                "text/plain",
                b"injected failure\n",
                method == "HEAD",
            );
        }
        Mode::RedirectSameOrigin if !path.starts_with("/mirror/") => {
            return redirect(&mut s, &format!("/mirror{target}"));
        }
        Mode::RedirectTo(port) => return redirect(&mut s, &format!("http://127.0.0.1:{port}{target}")),
        _ => {}
    }

    if method != "GET" && method != "HEAD" {
        return respond(&mut s, 405, "Method Not Allowed", "text/plain", b"", false);
    }
    let rel = path.strip_prefix("/mirror").unwrap_or(&path).trim_start_matches('/');
    let safe = !rel.is_empty()
        && !rel
            .split('/')
            .any(|c| c == ".." || c == "." || c.is_empty());
    let file = st.root.join(rel);
    let mut body = match safe.then(|| fs::read(&file)) {
        Some(Ok(b)) if file.is_file() => b,
        _ => {
            return respond(
                &mut s,
                404,
                "Not Found",
                "text/plain",
                b"not found\n",
                method == "HEAD",
            )
        }
    };
    let ctype = if path.ends_with(".narinfo") {
        "text/x-nix-narinfo"
    } else if path == "/nix-cache-info" {
        "text/plain"
    } else {
        "application/octet-stream"
    };
    let is_nar = path.starts_with("/nar/") && path.contains(".nar");
    // Extra header lines.
    let mut extra = String::new();
    let zstd = matches!(mode, Mode::ZstdEncoded | Mode::ZstdEncodedResetMidBody);
    if zstd {
        body = zstd::encode_all(&body[..], 3)?;
        extra = "Content-Encoding: zstd\r\n".into();
    }
    // `bytes=a-b` or `bytes=a-` (one range; what ncps asks to resume a NAR).
    let total = body.len() as u64;
    let span = range
        .filter(|_| st.ranges.load(Ordering::SeqCst) && method == "GET" && !zstd)
        .and_then(|r| {
            let (a, b) = r.trim().strip_prefix("bytes=")?.split_once('-')?;
            let a: u64 = a.parse().ok()?;
            let b: u64 = if b.is_empty() { total.saturating_sub(1) } else { b.parse().ok()? };
            Some((a, b.min(total.saturating_sub(1))))
        });
    let mut status = "200 OK".to_string();
    if let Some((a, b)) = span {
        if a >= total || a > b {
            let h = format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            s.write_all(h.as_bytes())?;
            return s.flush();
        }
        body = body[a as usize..=b as usize].to_vec();
        status = "206 Partial Content".into();
        extra = format!("Content-Range: bytes {a}-{b}/{total}\r\n");
    }
    // What is sent is corrupted in its middle (for a range: the middle of the part sent).
    if mode == Mode::CorruptByte && is_nar && !body.is_empty() {
        let i = body.len() / 2;
        body[i] ^= 0x5a;
    }
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: {ctype}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(header.as_bytes())?;
    if method == "HEAD" {
        return s.flush();
    }
    let count = |n: usize| {
        *st.sent.lock().unwrap().entry(path.clone()).or_insert(0) += n as u64;
    };
    match mode {
        Mode::ResetMidBody | Mode::CloseMidBody | Mode::ZstdEncodedResetMidBody => {
            s.write_all(&body[..body.len() / 2])?;
            s.flush()?;
            count(body.len() / 2);
            thread::sleep(Duration::from_millis(50));
            if mode != Mode::CloseMidBody {
                set_linger_zero(&s);
            } else {
                let _ = s.shutdown(Shutdown::Write);
            }
            drop(s);
        }
        Mode::StallMidBody => {
            s.write_all(&body[..body.len() / 2])?;
            s.flush()?;
            count(body.len() / 2);
            while st.generation.load(Ordering::SeqCst) == generation {
                thread::sleep(Duration::from_millis(50));
            }
        }
        Mode::Drip(every) => {
            st.dripping.fetch_add(1, Ordering::SeqCst);
            let mut cut = false;
            for b in &body {
                if st.generation.load(Ordering::SeqCst) != generation {
                    break;
                }
                if peer_closed(&s, every) || s.write_all(std::slice::from_ref(b)).and_then(|()| s.flush()).is_err() {
                    cut = true;
                    break;
                }
                count(1);
            }
            st.dripping.fetch_sub(1, Ordering::SeqCst);
            if cut {
                st.drip_cut.lock().unwrap().insert(path.clone(), Instant::now());
            }
        }
        Mode::Slow(bps) => {
            let chunk = (bps / 10).max(1) as usize;
            for c in body.chunks(chunk) {
                if st.generation.load(Ordering::SeqCst) != generation {
                    return Ok(());
                }
                // Counted before it is written: once ncps has a chunk, the count has it too
                // (counted after, a test that reads the count as soon as ncps answers could
                // find the last chunk missing while this thread waits for a core).
                count(c.len());
                s.write_all(c)?;
                s.flush()?;
                thread::sleep(Duration::from_millis(100));
            }
        }
        _ => {
            count(body.len());
            s.write_all(&body)?;
            s.flush()?;
        }
    }
    Ok(())
}

fn redirect(s: &mut TcpStream, location: &str) -> io::Result<()> {
    let h = format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(h.as_bytes())?;
    s.flush()
}

fn respond(
    s: &mut TcpStream,
    code: u16,
    reason: &str,
    ctype: &str,
    body: &[u8],
    head: bool,
) -> io::Result<()> {
    let h = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nContent-Type: {ctype}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(h.as_bytes())?;
    if !head {
        s.write_all(body)?;
    }
    s.flush()
}

/// Waits up to `wait` for the other end to close `s` (or the connection to break); true if it
/// did. What ncps sends on a kept-open upstream connection is only ever a new request, which
/// a dripping answer never gets to, so readable means closed here.
fn peer_closed(s: &TcpStream, wait: Duration) -> bool {
    use std::os::unix::io::AsRawFd;
    let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLRDHUP | libc::POLLIN, revents: 0 };
    // SAFETY: one valid, initialised pollfd for the open socket `s` borrows.
    let n = unsafe { libc::poll(&mut p, 1, wait.as_millis().min(i32::MAX as u128) as i32) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLIN) != 0
}

/// Makes close() send RST instead of FIN.
fn set_linger_zero(s: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is open for as long as `s` is borrowed; `l` is a valid linger
    // struct that outlives the call, and its size is passed with it.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

// ---------------------------------------------------------------------------
// HTTPS in front of an Upstream
// ---------------------------------------------------------------------------

/// An HTTPS front for an [`Upstream`]: it terminates TLS with a certificate for 127.0.0.1
/// issued by a throwaway CA (made with the `openssl` command) and relays each connection to
/// the plain upstream, so every misbehaviour of [`Mode`] reaches ncps over TLS too. A reset
/// or short body behind it ends the TLS stream without close_notify, as a broken link would.
pub struct TlsFront {
    port: u16,
    dir: TempDir,
    stop: Arc<AtomicBool>,
}

impl TlsFront {
    /// Errors when the `openssl` command is missing or fails.
    pub fn new(backend_port: u16) -> Result<TlsFront, String> {
        TlsFront::with_relay(backend_port, relay_tls, false)
    }

    /// A TLS front that relays bytes both ways for as long as the connection lasts, with ALPN
    /// `h2`: for HTTP/2 (a gRPC collector) behind it.
    pub fn for_h2(backend_port: u16) -> Result<TlsFront, String> {
        TlsFront::with_relay(backend_port, relay_both_ways, true)
    }

    fn with_relay(
        backend_port: u16,
        relay: fn(Arc<rustls::ServerConfig>, TcpStream, u16) -> io::Result<()>,
        h2: bool,
    ) -> Result<TlsFront, String> {
        let dir = TempDir::new("tls-front");
        let openssl = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .map_err(|e| format!("openssl: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
            }
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(&[&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ncps e2e test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign"]].concat())?;
        openssl(&[&["req"][..], &ec, &["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=127.0.0.1"]].concat())?;
        fs::write(dir.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
            .map_err(|e| e.to_string())?;
        openssl(&["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "leaf.ext", "-outform", "DER", "-out", "leaf.der"])?;
        openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", "leaf.key", "-outform", "DER", "-out", "leaf.key.der"])?;

        let read = |f: &str| fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"));
        let cert = rustls::pki_types::CertificateDer::from(read("leaf.der")?);
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(read("leaf.key.der")?.into());
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| format!("TLS server config: {e}"))?;
        if h2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let config = config.clone();
                thread::spawn(move || {
                    let _ = relay(config, conn, backend_port);
                });
            }
        });
        Ok(TlsFront { port, dir, stop })
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate (PEM) that issued the front's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the accept loop
    }
}

/// One request per connection (the test upstream always closes): read its head over TLS,
/// send it on in the clear, relay the answer back.
/// Relays bytes both ways between the TLS client and the backend until either side closes:
/// one thread, both sockets polled with a short read timeout.
fn relay_both_ways(config: Arc<rustls::ServerConfig>, conn: TcpStream, backend_port: u16) -> io::Result<()> {
    let tick = Some(Duration::from_millis(5));
    conn.set_read_timeout(tick)?;
    let server = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(server, conn);
    let mut back = TcpStream::connect(("127.0.0.1", backend_port))?;
    back.set_read_timeout(tick)?;
    let mut buf = vec![0u8; 64 * 1024];
    let idle = |e: &io::Error| matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
    loop {
        match tls.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => back.write_all(&buf[..n])?,
            Err(e) if idle(&e) => {}
            Err(e) => return Err(e),
        }
        match back.read(&mut buf) {
            Ok(0) => {
                tls.conn.send_close_notify();
                return tls.flush();
            }
            Ok(n) => {
                tls.write_all(&buf[..n])?;
                tls.flush()?;
            }
            Err(e) if idle(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

fn relay_tls(config: Arc<rustls::ServerConfig>, conn: TcpStream, backend_port: u16) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let server = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(server, conn);
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let mut back = TcpStream::connect(("127.0.0.1", backend_port))?;
    back.set_read_timeout(Some(Duration::from_secs(30)))?;
    back.write_all(&head)?;
    loop {
        let n = back.read(&mut buf)?;
        if n == 0 {
            break;
        }
        tls.write_all(&buf[..n])?;
    }
    tls.conn.send_close_notify();
    tls.flush()
}

