//! Shared helpers for the end-to-end tests: a Nix fixture built once per test
//! binary, a misbehaving test upstream, an `ncps` process handle, a wrapper
//! around the real `nix copy` client and a tiny HTTP client.
//!
//! Everything here uses std (plus crates that are already normal dependencies
//! of the package), and only loopback addresses.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Configuration every Nix invocation of the suite runs with.
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nsubstitute = false";

/// The hostname (and so the signing key name) the suite gives ncps by default.
pub const HOSTNAME: &str = "ncps-e2e.example.org";

/// A syntactically valid ed25519 public key, for tests that never verify anything.
pub const SOME_VALID_PUBLIC_KEY: &str =
    "up1.example.org-1:b+JbYUTfUJE3EDg/XZWj2ya0aK99irhQT0K8PjtpRSo=";

/// Environment variables ncps reads its configuration from; cleared for every
/// child so the caller's environment cannot leak into a test.
pub const NCPS_ENV_VARS: &[&str] = &[
    "CACHE_HOSTNAME",
    "CACHE_DATA_PATH",
    "UPSTREAM_CACHES",
    "UPSTREAM_PUBLIC_KEYS",
    "SERVER_ADDR",
    "LOG_LEVEL",
    "CACHE_STORAGE_LOCAL",
    "CACHE_UPSTREAM_URLS",
    "CACHE_UPSTREAM_PUBLIC_KEYS",
    "CACHE_SECRET_KEY_PATH",
    "CACHE_SIGN_NARINFO",
    "CACHE_TEMP_PATH",
    "CACHE_DATABASE_URL",
    "SERVER_WORKERS",
    "UPSTREAM_DIALER_TIMEOUT",
    "UPSTREAM_RESPONSE_HEADER_TIMEOUT",
    "CACHE_ALLOW_PUT_VERB",
    "CACHE_ALLOW_DELETE_VERB",
    "CACHE_MAX_SIZE",
    "PROMETHEUS_ENABLED",
];

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

fn tmp_base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Per-process directory holding every temporary directory of this run.
pub fn run_dir() -> PathBuf {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        remove_stale_dirs();
        let d = tmp_base().join(format!("e2e-run-{}", std::process::id()));
        fs::create_dir_all(&d).expect("create run dir");
        register_exit_cleanup();
        d
    })
    .clone()
}

/// A directory removed on drop, unless the current thread is panicking (a
/// failing test keeps its files for inspection; the path is printed).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = run_dir().join(format!("{label}-{n}"));
        let _ = remove_tree(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("[e2e] keeping {} for inspection", self.path.display());
        } else {
            let _ = remove_tree(&self.path);
        }
    }
}

/// remove_dir_all that also copes with read-only Nix store directories.
pub fn remove_tree(p: &Path) -> io::Result<()> {
    if !p.exists() {
        return Ok(());
    }
    if fs::remove_dir_all(p).is_ok() {
        return Ok(());
    }
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(p)
        .stderr(Stdio::null())
        .status();
    fs::remove_dir_all(p)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes run and fixture directories left behind by earlier test processes
/// that no longer exist (e.g. killed runs), together with their store paths.
fn remove_stale_dirs() {
    let Ok(rd) = fs::read_dir(tmp_base()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("e2e-run-")
            .or_else(|| name.strip_prefix("e2e-fixture-"))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        if name.starts_with("e2e-fixture-") {
            delete_fixture_store_paths(&e.path());
        }
        let _ = remove_tree(&e.path());
    }
}

fn delete_fixture_store_paths(dir: &Path) {
    let mut paths = Vec::new();
    for f in ["top-closure.txt", "many.txt", "drvs.txt"] {
        if let Ok(s) = fs::read_to_string(dir.join("paths").join(f)) {
            paths.extend(s.lines().filter(|l| !l.is_empty()).map(String::from));
        }
    }
    if paths.is_empty() {
        return;
    }
    let _ = Command::new("nix-store")
        .arg("--delete")
        .args(&paths)
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

extern "C" fn exit_cleanup() {
    let pid = std::process::id();
    let fx = tmp_base().join(format!("e2e-fixture-{pid}"));
    if fx.exists() {
        delete_fixture_store_paths(&fx);
        let _ = remove_tree(&fx);
    }
    // Only succeeds when empty: directories of failed tests are kept.
    let _ = fs::remove_dir(tmp_base().join(format!("e2e-run-{pid}")));
}

fn register_exit_cleanup() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| unsafe {
        libc::atexit(exit_cleanup);
    });
}

// ---------------------------------------------------------------------------
// Nix availability and the fixture
// ---------------------------------------------------------------------------

pub fn nix_installed() -> bool {
    Command::new("nix")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn running_under_ci() -> bool {
    matches!(std::env::var("CI"), Ok(v) if !v.is_empty())
}

/// Returns the fixture, or `None` (after printing why) when the test must be
/// skipped: only when `nix` is not installed and `CI` is unset. Under CI a
/// missing `nix` is a failure.
///
/// ```ignore
/// let Some(fx) = common::fixture_or_skip() else { return };
/// ```
pub fn fixture_or_skip() -> Option<&'static Fixture> {
    if !nix_installed() {
        let test = thread::current().name().unwrap_or("?").to_string();
        if running_under_ci() {
            panic!("{test}: `nix` is not installed but CI is set: end-to-end tests must run");
        }
        eprintln!(
            "SKIPPED {test}: `nix` is not installed (apt-get install nix-bin); set CI=true to make this a failure"
        );
        return None;
    }
    Some(fixture())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
    None,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

/// Real store paths published as signed binary caches (see mkfixture.sh).
#[derive(Debug)]
pub struct Fixture {
    pub dir: PathBuf,
    /// Key that signed every path of the caches.
    pub up1_public_key: String,
    pub up1_secret_key_file: PathBuf,
    /// Decoy key: signs nothing.
    pub up2_public_key: String,
    /// Top path; references `lib` and `big`.
    pub top: String,
    pub lib: String,
    pub big: String,
    pub top_closure: Vec<String>,
    /// Small independent paths.
    pub many: Vec<String>,
}

impl Fixture {
    /// Directory of the file:// cache with the given compression.
    pub fn cache_dir(&self, c: Compression) -> PathBuf {
        self.dir.join(format!("cache-{}", c.name()))
    }
    /// The upstream's narinfo text for a store path.
    pub fn upstream_narinfo(&self, c: Compression, store_path: &str) -> String {
        let p = self
            .cache_dir(c)
            .join(format!("{}.narinfo", store_hash(store_path)));
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }
}

/// The 32-character hash part of a store path.
pub fn store_hash(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap();
    &base[..32]
}

pub fn fixture() -> &'static Fixture {
    static FX: OnceLock<Result<Fixture, String>> = OnceLock::new();
    match FX.get_or_init(build_fixture) {
        Ok(f) => f,
        Err(e) => panic!("building the Nix fixture failed:\n{e}"),
    }
}

fn build_fixture() -> Result<Fixture, String> {
    build_fixture_with("mkfixture.sh")
}

/// Runs `tests/fixtures/<script> DIR` (a script that writes the layout of
/// mkfixture.sh) into this process's fixture directory and reads what it built.
/// The exit hook deletes the store paths listed under `DIR/paths`.
pub fn build_fixture_with(script: &str) -> Result<Fixture, String> {
    let _ = run_dir(); // stale cleanup + exit hook
    let dir = tmp_base().join(format!("e2e-fixture-{}", std::process::id()));
    let _ = remove_tree(&dir);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(script);
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(&dir);
    let out = run_with_timeout(cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}):\n{}\n{}",
            script.display(),
            dir.display(),
            out.status,
            out.stdout,
            out.stderr
        ));
    }
    eprintln!(
        "[e2e] fixture built in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        out.stdout.trim()
    );
    Ok(Fixture {
        up1_public_key: fixture_text(&dir, "keys/up1.pub")?,
        up1_secret_key_file: dir.join("keys/up1.sec"),
        up2_public_key: fixture_text(&dir, "keys/up2.pub")?,
        top: fixture_text(&dir, "paths/top.txt")?,
        lib: fixture_text(&dir, "paths/lib.txt")?,
        big: fixture_text(&dir, "paths/big.txt")?,
        top_closure: fixture_lines(&dir, "paths/top-closure.txt")?,
        many: fixture_lines(&dir, "paths/many.txt")?,
        dir,
    })
}

/// A fixture file's text, trimmed.
pub fn fixture_text(dir: &Path, p: &str) -> Result<String, String> {
    fs::read_to_string(dir.join(p))
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{p}: {e}"))
}

/// A fixture file's lines (a list of store paths).
pub fn fixture_lines(dir: &Path, p: &str) -> Result<Vec<String>, String> {
    Ok(fixture_text(dir, p)?.lines().map(String::from).collect())
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion, killing it after `timeout` (then Err).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {desc}: {e}"))?;
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let t2 = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = String::from_utf8_lossy(&t1.join().unwrap_or_default()).into_owned();
                let stderr = String::from_utf8_lossy(&t2.join().unwrap_or_default()).into_owned();
                return Err(format!(
                    "timed out after {timeout:?}: {desc}\nstdout:\n{stdout}\nstderr:\n{stderr}"
                ));
            }
            Err(e) => return Err(format!("wait {desc}: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: String::from_utf8_lossy(&t1.join().unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&t2.join().unwrap_or_default()).into_owned(),
    })
}

/// A loopback port nothing listens on (bound then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// The real Nix client
// ---------------------------------------------------------------------------

/// `nix copy --from URL --to <fresh store> PATHS` trusting only `trusted_key`,
/// then `nix store verify -r` of the copied paths against the same key.
/// Each call uses a fresh XDG_CACHE_HOME (Nix caches narinfo answers there).
pub fn nix_copy_from<S: AsRef<str>>(
    url: &str,
    paths: &[S],
    trusted_key: &str,
) -> Result<(), String> {
    nix_copy_from_timeout(url, paths, trusted_key, Duration::from_secs(90))
}

pub fn nix_copy_from_timeout<S: AsRef<str>>(
    url: &str,
    paths: &[S],
    trusted_key: &str,
    timeout: Duration,
) -> Result<(), String> {
    let tmp = TempDir::new("nix-client");
    let store = tmp.join("store");
    let xdg = tmp.join("xdg");
    fs::create_dir_all(&xdg).unwrap();
    let nix = |args: &[&str]| -> Command {
        let mut c = Command::new("nix");
        c.args(args)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("XDG_CACHE_HOME", &xdg)
            .env_remove("NIX_REMOTE");
        c
    };
    let store_s = store.to_string_lossy().into_owned();
    let mut copy = nix(&["copy", "--from", url, "--to", &store_s]);
    let paths: Vec<&str> = paths.iter().map(|p| p.as_ref()).collect();
    copy.args(&paths).args([
        "--option",
        "trusted-public-keys",
        trusted_key,
        "--option",
        "connect-timeout",
        "5",
    ]);
    let out = run_with_timeout(copy, timeout)?;
    if !out.status.success() {
        return Err(format!(
            "nix copy --from {url} failed ({}):\n{}",
            out.status,
            out.stderr.trim()
        ));
    }
    let mut verify = nix(&["store", "verify", "--store", &store_s, "-r"]);
    verify
        .args(&paths)
        .args(["--option", "trusted-public-keys", trusted_key]);
    let out = run_with_timeout(verify, timeout)?;
    if !out.status.success() {
        return Err(format!(
            "nix store verify after copying from {url} failed ({}):\n{}",
            out.status,
            out.stderr.trim()
        ));
    }
    Ok(())
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
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: ncps-e2e\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
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
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
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
// Test upstream: a static file server that can misbehave on demand
// ---------------------------------------------------------------------------

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
    /// Bumped by stop(): connection threads of older generations give up.
    generation: AtomicU64,
    stopped: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
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
            generation: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
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

    /// Body bytes written so far for this exact path, over all its requests.
    /// Updated after every write, so while a Slow body is being sent it counts up.
    pub fn bytes_sent(&self, path: &str) -> u64 {
        *self.state.sent.lock().unwrap().get(path).unwrap_or(&0)
    }

    pub fn reset_hits(&self) {
        self.state.hits.lock().unwrap().clear();
        self.state.sent.lock().unwrap().clear();
        self.state.requests.lock().unwrap().clear();
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
    st.requests.lock().unwrap().push(format!("{method} {path}"));

    let (mode, tgt) = *st.mode.lock().unwrap();
    let mode = if tgt.matches(&path) {
        mode
    } else {
        Mode::Normal
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
        _ => {}
    }

    if method != "GET" && method != "HEAD" {
        return respond(&mut s, 405, "Method Not Allowed", "text/plain", b"", false);
    }
    let rel = path.trim_start_matches('/');
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
    if mode == Mode::CorruptByte && is_nar && !body.is_empty() {
        let i = body.len() / 2;
        body[i] ^= 0x5a;
    }
    let mut encoding = "";
    if mode == Mode::ZstdEncoded {
        body = zstd::encode_all(&body[..], 3)?;
        encoding = "Content-Encoding: zstd\r\n";
    }
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: {ctype}\r\n{encoding}Connection: close\r\n\r\n",
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
        Mode::ResetMidBody | Mode::CloseMidBody => {
            s.write_all(&body[..body.len() / 2])?;
            s.flush()?;
            count(body.len() / 2);
            thread::sleep(Duration::from_millis(50));
            if mode == Mode::ResetMidBody {
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
        Mode::Slow(bps) => {
            let chunk = (bps / 10).max(1) as usize;
            for c in body.chunks(chunk) {
                if st.generation.load(Ordering::SeqCst) != generation {
                    return Ok(());
                }
                s.write_all(c)?;
                s.flush()?;
                count(c.len());
                thread::sleep(Duration::from_millis(100));
            }
        }
        _ => {
            s.write_all(&body)?;
            s.flush()?;
            count(body.len());
        }
    }
    Ok(())
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

/// Makes close() send RST instead of FIN.
fn set_linger_zero(s: &TcpStream) {
    use std::os::unix::io::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
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
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| format!("TLS server config: {e}"))?;
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
                    let _ = relay_tls(config, conn, backend_port);
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

// ---------------------------------------------------------------------------
// ncps process handle
// ---------------------------------------------------------------------------

/// Path of the binary under test: NCPS_E2E_BIN if set (e.g. a release or
/// static build), else the crate's own `ncps` binary.
pub fn ncps_bin() -> String {
    std::env::var("NCPS_E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ncps").to_string())
}

/// A running `ncps serve`. Killed on drop; its log is printed when the test
/// fails. In args and env values, `{addr}` and `{data}` are replaced with the
/// listen address and the data directory.
pub struct Ncps {
    child: Option<Child>,
    pub addr: SocketAddr,
    data: TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Ncps {
    /// `ncps serve --cache-hostname HOSTNAME --cache-data-path {data}
    /// --server-addr {addr} --log-level debug` followed by `extra`.
    pub fn start(extra: &[&str]) -> Ncps {
        Ncps::start_with_hostname(HOSTNAME, extra)
    }

    /// As [`Ncps::start`], with these environment variables set for ncps.
    pub fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Ncps {
        Ncps::start_with_hostname_and_env(HOSTNAME, extra, envs)
    }

    pub fn start_with_hostname(hostname: &str, extra: &[&str]) -> Ncps {
        Ncps::start_with_hostname_and_env(hostname, extra, &[])
    }

    fn start_with_hostname_and_env(hostname: &str, extra: &[&str], envs: &[(&str, &str)]) -> Ncps {
        let mut args: Vec<String> = [
            "serve",
            "--cache-hostname",
            hostname,
            "--cache-data-path",
            "{data}",
            "--server-addr",
            "{addr}",
            "--log-level",
            "debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Ncps::start_raw(args, envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// Typical proxy: one or more upstream URLs, each trusted with `key`.
    pub fn for_upstreams(upstreams: &[String], key: &str) -> Ncps {
        let mut extra: Vec<&str> = Vec::new();
        for u in upstreams {
            extra.push("--upstream-cache");
            extra.push(u);
        }
        extra.push("--upstream-public-key");
        extra.push(key);
        Ncps::start(&extra)
    }

    /// Proxy for `upstreams`, trusting each of `keys` (none: no
    /// --upstream-public-key at all), followed by `extra` flags.
    pub fn for_upstreams_with(upstreams: &[String], keys: &[&str], extra: &[&str]) -> Ncps {
        let mut args: Vec<&str> = Vec::new();
        for u in upstreams {
            args.push("--upstream-cache");
            args.push(u);
        }
        for k in keys {
            args.push("--upstream-public-key");
            args.push(k);
        }
        args.extend_from_slice(extra);
        Ncps::start(&args)
    }

    /// Exactly these args and env vars (placeholders substituted).
    pub fn start_raw(args: Vec<String>, envs: Vec<(String, String)>) -> Ncps {
        let data = TempDir::new("ncps-data");
        let mut n = Ncps {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data,
            args,
            envs,
        };
        // A freshly chosen port can be taken by someone else before ncps
        // binds it: retry with another port in that case only.
        for attempt in 0..3 {
            match n.spawn_and_wait() {
                Ok(()) => return n,
                Err(e) if attempt < 2 && e.contains("in use") => {
                    n.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.data.join("ncps.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// GET /pubkey, trimmed.
    pub fn pubkey(&self) -> String {
        let r = http_get(&format!("{}/pubkey", self.url()))
            .unwrap_or_else(|e| panic!("GET /pubkey: {e}\n{}", self.log()));
        assert_eq!(r.status, 200, "GET /pubkey status");
        r.text().trim().to_string()
    }

    pub fn get(&self, path: &str) -> Response {
        http_get(&format!("{}{path}", self.url())).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn head(&self, path: &str) -> Response {
        http_head(&format!("{}{path}", self.url())).unwrap_or_else(|e| panic!("HEAD {path}: {e}"))
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }

    /// SIGKILL, no chance to clean up (as a power cut or the OOM killer would).
    /// `restart()` afterwards starts it again on the same data dir and port.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is still running (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Files under DATA/store/nar (any depth).
    pub fn stored_nar_files(&self) -> Vec<PathBuf> {
        files_under(&self.data.join("store/nar"))
    }

    /// The stored NAR files once there are `n` of them, or after 10 s whatever there is: a
    /// verified download reaches its clients just before its file is moved into the store.
    pub fn wait_for_stored_nars(&self, n: usize) -> Vec<PathBuf> {
        wait_until(Duration::from_secs(10), || self.stored_nar_files().len() == n);
        self.stored_nar_files()
    }

    /// Files under DATA/store/narinfo (any depth).
    pub fn stored_narinfo_files(&self) -> Vec<PathBuf> {
        files_under(&self.data.join("store/narinfo"))
    }

    /// `*.ncps-partial` files anywhere under the data dir.
    pub fn partial_files(&self) -> Vec<PathBuf> {
        files_under(self.data.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".ncps-partial"))
            .collect()
    }

    /// The log written since byte `offset` (see `log_len`).
    pub fn log_since(&self, offset: usize) -> String {
        let log = self.log();
        log.get(offset..).unwrap_or("").to_string()
    }

    pub fn log_len(&self) -> usize {
        self.log().len()
    }

    /// Stops and starts again with the same data dir, args and port.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!("{e}");
        }
    }

    fn subst(&self, s: &str) -> String {
        s.replace("{addr}", &self.addr.to_string())
            .replace("{data}", &self.data.path().to_string_lossy())
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open ncps log");
        let bin = ncps_bin();
        let mut cmd = Command::new(&bin);
        for v in NCPS_ENV_VARS {
            cmd.env_remove(v);
        }
        cmd.args(self.args.iter().map(|a| self.subst(a)));
        for (k, v) in &self.envs {
            cmd.env(k, self.subst(v));
        }
        let log_offset = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("spawn {bin}: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = format!("{}/nix-cache-info", self.url());
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                let log = self.log();
                let new = log.get(log_offset as usize..).unwrap_or(&log).to_string();
                let args: Vec<String> = self.args.iter().map(|a| self.subst(a)).collect();
                return Err(format!(
                    "ncps exited ({st}) before answering /nix-cache-info; args {args:?}; log:\n{new}"
                ));
            }
            if let Ok(r) = http_get(&url) {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "ncps did not answer GET /nix-cache-info with 200 within 10 s; log:\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ncps {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "----- ncps log ({}; last {} lines) -----\n{}\n----- end of ncps log -----",
                self.log_path().display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Runs ncps expecting a configuration error. Returns the exit status and
/// stderr. The listen address is a port this helper holds, so an ncps that
/// binds before validating fails with an address error instead.
pub fn run_ncps_expecting_failure(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let mut cmd = Command::new(ncps_bin());
    for v in NCPS_ENV_VARS {
        cmd.env_remove(v);
    }
    cmd.args(args.iter().map(|a| a.replace("{addr}", &addr)));
    for (k, v) in envs {
        cmd.env(k, v.replace("{addr}", &addr));
    }
    let out = run_with_timeout(cmd, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("ncps did not exit on bad configuration: {e}"));
    drop(holder);
    (out.status.code(), out.stderr)
}

// ---------------------------------------------------------------------------
// narinfo, keys, signatures
// ---------------------------------------------------------------------------

/// Parsed narinfo: fields in order (Sig may repeat).
#[derive(Debug, Clone)]
pub struct NarInfo {
    pub fields: Vec<(String, String)>,
}

impl NarInfo {
    pub fn parse(text: &str) -> NarInfo {
        let fields = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        NarInfo { fields }
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn sigs(&self) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(k, _)| k == "Sig")
            .map(|(_, v)| v.clone())
            .collect()
    }
    /// `1;StorePath;NarHash;NarSize;refs,as,full,paths`
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self
            .get("References")
            .unwrap_or("")
            .split_whitespace()
            .map(|r| format!("/nix/store/{r}"))
            .collect();
        format!(
            "1;{};{};{};{}",
            self.get("StorePath").unwrap_or(""),
            self.get("NarHash").unwrap_or(""),
            self.get("NarSize").unwrap_or(""),
            refs.join(",")
        )
    }
}

/// Standard base64 decoding (with or without padding).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    let s = s.trim_end_matches('=');
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Splits `name:base64` into the name and decoded bytes.
pub fn parse_key(k: &str) -> Option<(String, Vec<u8>)> {
    let (name, b64) = k.trim().split_once(':')?;
    Some((name.to_string(), base64_decode(b64)?))
}

/// Does `sig` (`name:base64`) verify `message` under `public_key` (`name:base64`)?
pub fn signature_verifies(public_key: &str, message: &str, sig: &str) -> bool {
    let (Some((kn, kb)), Some((sn, sb))) = (parse_key(public_key), parse_key(sig)) else {
        return false;
    };
    if kn != sn {
        return false;
    }
    let (Ok(pk), Ok(s)) = (
        ed25519_compact::PublicKey::from_slice(&kb),
        ed25519_compact::Signature::from_slice(&sb),
    ) else {
        return false;
    };
    pk.verify(message.as_bytes(), &s).is_ok()
}

// ---------------------------------------------------------------------------
// Files, hashes
// ---------------------------------------------------------------------------

/// Every regular file under `dir` (any depth), sorted; empty if `dir` is missing.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(e.path());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().try_into().unwrap()
}

/// Incremental SHA-256, for bodies too large to keep.
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b)
    }
    pub fn finish(self) -> [u8; 32] {
        self.0.finish().as_ref().try_into().unwrap()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

/// Nix's base-32 ("nix32") encoding, as in `sha256:<nix32>` and NAR file names.
pub fn nix32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = (bytes.len() * 8).div_ceil(5);
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = (bytes[i] as u32) >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u32) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// `true` when `path` holds exactly the bytes its NAR file name promises: the
/// name (up to the first '.') is the nix32 SHA-256 of the file, as in
/// fixture caches and in ncps's store. Returns the mismatch otherwise.
pub fn nar_file_matches_its_name(path: &Path) -> Result<(), String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let want = name.split('.').next().unwrap_or("");
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let got = nix32(&sha256(&bytes));
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{}: {} bytes hashing to {got}, not to the name",
            path.display(),
            bytes.len()
        ))
    }
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Fixture variants
// ---------------------------------------------------------------------------

/// Signs `message` with a Nix secret key file (`name:base64(64 bytes)`),
/// giving a `name:base64` Sig value.
pub fn sign_with_key_file(secret_key_file: &Path, message: &str) -> String {
    use base64::Engine as _;
    let text = fs::read_to_string(secret_key_file)
        .unwrap_or_else(|e| panic!("{}: {e}", secret_key_file.display()));
    let (name, bytes) = parse_key(&text).expect("secret key name:base64");
    let sk = ed25519_compact::SecretKey::from_slice(&bytes).expect("64-byte ed25519 secret key");
    let sig = sk.sign(message.as_bytes(), None);
    format!(
        "{name}:{}",
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    )
}

/// A copy of the fixture cache `c` whose narinfos carry, instead of their
/// Sig lines, one signature by `secret_key_file` (NARs are hard links).
pub fn resigned_cache_copy(fx: &Fixture, c: Compression, secret_key_file: &Path) -> TempDir {
    let src = fx.cache_dir(c);
    let dst = TempDir::new(&format!("cache-{}-resigned", c.name()));
    for f in files_under(&src) {
        let rel = f.strip_prefix(&src).unwrap();
        let out = dst.join(rel);
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        if f.extension().is_some_and(|e| e == "narinfo") {
            let text = fs::read_to_string(&f).unwrap();
            let sig = sign_with_key_file(secret_key_file, &NarInfo::parse(&text).fingerprint());
            let mut new: String = text
                .lines()
                .filter(|l| !l.starts_with("Sig:"))
                .map(|l| format!("{l}\n"))
                .collect();
            new.push_str(&format!("Sig: {sig}\n"));
            fs::write(&out, new).unwrap();
        } else if fs::hard_link(&f, &out).is_err() {
            fs::copy(&f, &out).unwrap();
        }
    }
    dst
}

/// The upstream URL path (`/nar/...`) of the NAR a fixture narinfo points at.
pub fn upstream_nar_path(fx: &Fixture, c: Compression, store_path: &str) -> String {
    let ni = NarInfo::parse(&fx.upstream_narinfo(c, store_path));
    format!("/{}", ni.get("URL").expect("URL in fixture narinfo"))
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
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
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
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
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
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
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
    format!("GET {path} HTTP/1.1\r\nHost: ncps-e2e\r\nUser-Agent: ncps-e2e-raw\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// Raw `GET path`, streaming the body through SHA-256 instead of keeping it.
pub struct HashedGet {
    pub status: u16,
    pub content_length: Option<u64>,
    pub len: u64,
    pub sha256: [u8; 32],
    pub end: BodyEnd,
}

pub fn raw_get_hashed(addr: SocketAddr, path: &str, read_timeout: Duration) -> io::Result<HashedGet> {
    let mut c = RawConn::connect(addr, read_timeout)?;
    c.send(&get_request(path))?;
    let (status, headers) = c.read_head()?;
    let content_length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok());
    let mut h = Sha256::new();
    let (len, end) = c.drain_body(|b| h.update(b));
    Ok(HashedGet {
        status,
        content_length,
        len,
        sha256: h.finish(),
        end,
    })
}
