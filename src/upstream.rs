//! Talking to upstream caches: a blocking HTTP client with every timeout set.
//!
//! An upstream is never trusted to be up, fast or honest. Connecting, waiting for headers and
//! waiting for each piece of a body all have limits (a stalled upstream must not hold a worker
//! or a download forever), and the caller checks every byte that comes back.
//!
//! Idle timeouts alone are not enough: an upstream that sends one byte every 2 s under a 3 s
//! idle timeout never trips one, and would hold a 540-byte narinfo ~18 min (the 1 MiB cap
//! allows ~24 days). So every request also has a total deadline ([`Deadlines`]), from the
//! first connect to the last body byte, derived from the size the answer may have: a narinfo
//! gets `--upstream-narinfo-timeout` (15 s: five header timeouts), a NAR
//! `--upstream-nar-timeout` (60 s) plus its FileSize at `--upstream-nar-min-rate` (64 KiB/s).
//! Past it the request fails as [`UpstreamError::Deadline`], an outage like any timeout.
//!
//! Redirects are followed by hand, only on the upstream's own origin (scheme, host and port)
//! and at most [`MAX_REDIRECTS`] times: an upstream must not make ncps send requests to any
//! other host or port on the LAN, nor receive its credentials. A redirect elsewhere is an
//! error that names where it pointed ([`UpstreamError::RedirectElsewhere`]).

use crate::nix::narinfo::MAX_NARINFO_BYTES;
use crate::nix::StorePathHash;
use std::fmt;
use std::io::Read;
use std::time::Duration;

/// Why an upstream request failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The upstream answered with a status that is neither success nor "not here".
    Status(u16),
    /// Connecting, sending or receiving the head failed (including timeouts).
    Transport(Box<ureq::Error>),
    /// Reading the body failed.
    Read(std::io::Error),
    /// The answer is larger than anything legitimate.
    TooLarge,
    /// A `Content-Encoding` ncps cannot undo.
    UnsupportedEncoding(String),
    /// The zstd decoder could not start.
    Decoder(std::io::Error),
    /// A request for the rest of a NAR got something other than exactly that rest.
    NotPartial(NotPartial),
    /// A redirect to another origin (not followed): where it pointed.
    RedirectElsewhere(String),
    /// More than [`MAX_REDIRECTS`] redirects, or one without a usable `Location`.
    BadRedirect(&'static str),
    /// The request was still not done at its deadline ([`Deadlines`]): how long it had.
    Deadline(Duration),
    /// Everyone who wanted the answer left, so the request was dropped (no outage).
    Abandoned,
}

/// How long an upstream request may take in all, from the connect to the last body byte
/// (pure: the e2e tests and the unit tests below hold it to its numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// A narinfo (at most 1 MiB) or `/nix-cache-info`.
    pub narinfo: Duration,
    /// What a NAR request gets whatever its size (connect, headers, a slow start).
    pub nar_base: Duration,
    /// The slowest rate, in bytes per second, a NAR body is given time for (not zero).
    pub nar_min_rate: u64,
}

/// A deadline for people: whole seconds when it is near them (a NAR's has nanoseconds of
/// FileSize / rate in it), else tenths.
fn shown(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// No deadline is longer (and `Instant + deadline` cannot overflow).
pub const LONGEST_DEADLINE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The size a NAR fetched by name without an announced length is given time for.
pub const UNKNOWN_NAR_SIZE: u64 = 4 << 30;

impl Deadlines {
    /// `nar_base + size / nar_min_rate`, at most [`LONGEST_DEADLINE`].
    ///
    /// ```
    /// use ncps::upstream::Deadlines;
    /// use std::time::Duration;
    /// let d = Deadlines { narinfo: Duration::from_secs(15), nar_base: Duration::from_secs(60), nar_min_rate: 64 << 10 };
    /// assert_eq!(d.nar(64 << 20), Duration::from_secs(60 + 1024));
    /// ```
    pub fn nar(&self, size: u64) -> Duration {
        let rate = u128::from(self.nar_min_rate.max(1));
        let nanos = u128::from(size) * 1_000_000_000 / rate;
        let body = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.nar_base.saturating_add(body).min(LONGEST_DEADLINE)
    }

    /// The rest of a NAR, `from..total`, asked for with a Range request.
    pub fn nar_rest(&self, from: u64, total: u64) -> Duration {
        self.nar(total.saturating_sub(from))
    }

    /// Whether a download that got `bytes` in the last `window` made real progress: at least
    /// half the minimum rate. One nobody waits for that does not is given up (its slot is
    /// worth more to the next miss). A window shorter than a second says nothing yet.
    pub fn progressing(&self, bytes: u64, window: Duration) -> bool {
        if window < Duration::from_secs(1) {
            return true;
        }
        let wanted = u128::from(self.nar_min_rate) * window.as_millis() / 2000;
        u128::from(bytes) >= wanted
    }
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines { narinfo: Duration::from_secs(15), nar_base: Duration::from_secs(60), nar_min_rate: 64 << 10 }
    }
}

/// Why an answer to `Range: bytes=<from>-` is not the rest of the file ([`check_partial`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotPartial {
    /// A 200: the server ignores ranges. Its body starts at byte 0; ncps does not read and
    /// throw away the bytes it already has, it asks the next upstream instead.
    WholeFile,
    /// A 416, or a 206 without a usable `Content-Range`.
    Unsatisfiable,
    /// A 206 for other bytes (its `Content-Range` or length), or for another file size.
    OtherRange(String),
    /// A 206 with a `Content-Encoding`: a range of an encoded stream is not a range of the file.
    Encoded(String),
}

impl fmt::Display for NotPartial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotPartial::WholeFile => f.write_str("it ignores ranges (200 to a Range request)"),
            NotPartial::Unsatisfiable => f.write_str("it cannot serve that range"),
            NotPartial::OtherRange(r) => write!(f, "it sent another range ({r})"),
            NotPartial::Encoded(e) => write!(f, "the range came with Content-Encoding {e:?}"),
        }
    }
}

/// Same-origin redirects followed at most, per request.
pub const MAX_REDIRECTS: usize = 3;

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Status(s) => write!(f, "HTTP status {s}"),
            UpstreamError::Transport(e) => write!(f, "{e}"),
            UpstreamError::Read(e) => write!(f, "{e}"),
            UpstreamError::TooLarge => write!(f, "response too large"),
            UpstreamError::UnsupportedEncoding(e) => write!(f, "unsupported Content-Encoding {e:?}"),
            UpstreamError::Decoder(e) => write!(f, "zstd decoder: {e}"),
            UpstreamError::NotPartial(e) => write!(f, "no resume: {e}"),
            UpstreamError::RedirectElsewhere(to) => {
                write!(f, "redirected to another origin ({to}); not followed")
            }
            UpstreamError::BadRedirect(why) => write!(f, "redirect not followed: {why}"),
            UpstreamError::Deadline(d) => write!(f, "not done within its deadline of {}", shown(*d)),
            UpstreamError::Abandoned => f.write_str("abandoned: every client that wanted it left"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Transport(e) => Some(e.as_ref()),
            UpstreamError::Read(e) | UpstreamError::Decoder(e) => Some(e),
            _ => None,
        }
    }
}

impl UpstreamError {
    /// Whether this says the upstream is unwell (unreachable, timing out, answering 5xx or
    /// 429), rather than that it answered something ncps does not accept. Only these count
    /// towards marking an upstream down (`cache::health`).
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Status(s) => *s >= 500 || *s == 429,
            UpstreamError::Transport(_) | UpstreamError::Read(_) | UpstreamError::Deadline(_) => true,
            UpstreamError::Abandoned
            | UpstreamError::TooLarge
            | UpstreamError::UnsupportedEncoding(_)
            | UpstreamError::Decoder(_)
            | UpstreamError::NotPartial(_)
            | UpstreamError::RedirectElsewhere(_)
            | UpstreamError::BadRedirect(_) => false,
        }
    }

    /// Whether it was a timeout: connecting, waiting for the head, or for the body.
    pub fn is_timeout(&self) -> bool {
        match self {
            UpstreamError::Transport(e) => ureq_timed_out(e),
            UpstreamError::Read(e) => io_timed_out(e),
            UpstreamError::Deadline(_) => true,
            _ => false,
        }
    }

    /// A transport error that is ureq's global timeout becomes [`UpstreamError::Deadline`].
    fn at_deadline(self, limit: Duration) -> UpstreamError {
        match &self {
            UpstreamError::Transport(e) if matches!(**e, ureq::Error::Timeout(ureq::Timeout::Global)) => {
                UpstreamError::Deadline(limit)
            }
            UpstreamError::Read(e) if past_deadline(e) => UpstreamError::Deadline(limit),
            _ => self,
        }
    }
}

/// Whether a body read failed on ureq's global timeout (the request's deadline).
fn past_deadline(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|x| x.downcast_ref::<ureq::Error>())
        .is_some_and(|x| matches!(x, ureq::Error::Timeout(ureq::Timeout::Global)))
        || e.get_ref().and_then(|x| x.downcast_ref::<UpstreamError>()).is_some_and(|x| matches!(x, UpstreamError::Deadline(_)))
}

/// A body that fails with [`UpstreamError::Deadline`] (inside an `io::Error` of kind
/// `TimedOut`) once `until` has passed, checked before each read; ureq's own deadline errors
/// are shown the same way.
struct Deadlined<R> {
    inner: R,
    until: Option<std::time::Instant>,
    limit: Duration,
}

impl<R: Read> Read for Deadlined<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let late = || std::io::Error::new(std::io::ErrorKind::TimedOut, UpstreamError::Deadline(self.limit));
        if self.until.is_some_and(|t| std::time::Instant::now() >= t) {
            return Err(late());
        }
        match self.inner.read(buf) {
            Err(e) if past_deadline(&e) => Err(late()),
            r => r,
        }
    }
}

/// `reader`, failing once `limit` from now has passed (checked between reads): the deadline
/// of a NAR whose length became known only with its answer (one fetched by name).
pub fn within(reader: Box<dyn Read + Send>, limit: Duration) -> Box<dyn Read + Send> {
    let until = std::time::Instant::now().checked_add(limit);
    Box::new(Deadlined { inner: reader, until, limit })
}

fn ureq_timed_out(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) => true,
        ureq::Error::Io(e) => io_timed_out(e),
        _ => false,
    }
}

/// Whether an I/O error from an upstream body is a timeout.
pub fn io_timed_out(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{TimedOut, WouldBlock};
    // ureq hands its own timeouts to readers as an io::Error wrapping its error.
    matches!(e.kind(), TimedOut | WouldBlock) || e.get_ref().and_then(|x| x.downcast_ref::<ureq::Error>()).is_some_and(ureq_timed_out)
}

impl From<ureq::Error> for UpstreamError {
    fn from(e: ureq::Error) -> Self {
        UpstreamError::Transport(Box::new(e))
    }
}

/// One upstream cache, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The base URL without a trailing slash or query.
    pub url: String,
    pub priority: Option<u32>,
}

/// What the upstream client is told by the configuration (built in `serve::prepare`).
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// What to send each upstream's origin as `Authorization`.
    pub auth: crate::auth::UpstreamAuth,
    /// The upstreams, in the order they are tried.
    pub list: Vec<UpstreamConfig>,
    pub dial_timeout: Duration,
    pub header_timeout: Duration,
    /// The longest wait for the next piece of a body.
    pub body_idle_timeout: Duration,
    /// The longest any request may take in all.
    pub deadlines: Deadlines,
}

/// A NAR body being received.
pub struct NarBody {
    pub reader: Box<dyn Read + Send>,
    /// The length the upstream announced, if it did (before any Content-Encoding is undone).
    pub content_length: Option<u64>,
    /// Whether the upstream compressed the transfer (`Content-Encoding: zstd`); the reader
    /// already undoes it.
    pub decoded: bool,
}

pub struct Upstreams {
    list: Vec<UpstreamConfig>,
    agent: ureq::Agent,
    auth: crate::auth::UpstreamAuth,
    deadlines: Deadlines,
}

impl Upstreams {
    pub fn new(settings: UpstreamSettings) -> Upstreams {
        let UpstreamSettings {
            auth,
            list,
            dial_timeout: dial,
            header_timeout: header,
            body_idle_timeout: body_idle,
            deadlines,
        } = settings;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(crate::tls::root_certs())))
            .build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Followed by hand (`get`), on the same origin only.
            .max_redirects(0)
            .timeout_connect(Some(dial))
            .timeout_resolve(Some(dial))
            .timeout_recv_response(Some(header))
            .timeout_per_read(Some(body_idle))
            .timeout_send_request(Some(header))
            .user_agent(concat!("ncps/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(8)
            .tls_config(tls)
            .build()
            .new_agent();
        Upstreams { list, agent, auth, deadlines }
    }

    pub fn deadlines(&self) -> &Deadlines {
        &self.deadlines
    }

    /// The origins ncps has credentials for (never the credentials).
    pub fn credential_origins(&self) -> Vec<String> {
        self.auth.origins().map(str::to_string).collect()
    }

    pub fn list(&self) -> &[UpstreamConfig] {
        &self.list
    }

    /// Fetches `<upstream>/<hash>.narinfo`. `Ok(None)` when the upstream says it has no such
    /// path (404, 403 and 410 mean that in Nix's protocol). `abandoned` is asked between
    /// reads: when it says yes (every client that wanted this left), the request is dropped
    /// (its connection closed) as [`UpstreamError::Abandoned`].
    pub fn narinfo(
        &self,
        upstream: &UpstreamConfig,
        hash: &StorePathHash,
        abandoned: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<u8>>, UpstreamError> {
        self.narinfo_timed(upstream, hash, abandoned).0
    }

    /// As [`Upstreams::narinfo`], and how long the upstream took to send its response head
    /// (`None` if it sent none): its latency, apart from the body.
    pub fn narinfo_timed(
        &self,
        upstream: &UpstreamConfig,
        hash: &StorePathHash,
        abandoned: &dyn Fn() -> bool,
    ) -> (Result<Option<Vec<u8>>, UpstreamError>, Option<Duration>) {
        let started = std::time::Instant::now();
        let limit = self.deadlines.narinfo;
        let resp = self.get(&format!("{}/{hash}.narinfo", upstream.url), &[], limit);
        let head = resp.as_ref().ok().map(|_| started.elapsed());
        (resp.and_then(|r| Self::narinfo_body(r, limit, abandoned)), head)
    }

    /// The body of a narinfo answer, `None` for a clean "not here".
    fn narinfo_body(
        resp: ureq::http::Response<ureq::Body>,
        limit: Duration,
        abandoned: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<u8>>, UpstreamError> {
        match resp.status().as_u16() {
            200 => {}
            403 | 404 | 410 => return Ok(None),
            s => return Err(UpstreamError::Status(s)),
        }
        let max = MAX_NARINFO_BYTES as u64 + 1;
        let mut body = Vec::new();
        // Not asked for, but some servers compress every response; the limit applies to the
        // decoded text, so a small, highly compressed body cannot grow without bound.
        let encoding = content_encoding(&resp);
        let (reader, _) = decode(resp.into_body().into_reader(), &encoding)?;
        let mut reader = reader.take(max);
        let mut buf = [0u8; 16 * 1024];
        loop {
            if abandoned() {
                return Err(UpstreamError::Abandoned);
            }
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(UpstreamError::Read(e).at_deadline(limit)),
            }
        }
        if body.len() as u64 >= max {
            return Err(UpstreamError::TooLarge);
        }
        Ok(Some(body))
    }

    /// Asks for `<upstream>/nix-cache-info`: whether the upstream answers at all (the probe of
    /// an upstream marked down). Any answer but a 5xx or 429 counts: a server without that
    /// file is still up.
    pub fn cache_info(&self, upstream: &UpstreamConfig) -> Result<(), UpstreamError> {
        let url = format!("{}/nix-cache-info", upstream.url);
        let limit = self.deadlines.narinfo;
        let resp = self.get(&url, &[], limit)?;
        let e = UpstreamError::Status(resp.status().as_u16());
        if e.is_outage() {
            return Err(e);
        }
        // Read (a few bytes at most), so the connection can be used again.
        let mut sink = Vec::new();
        resp.into_body()
            .into_reader()
            .take(64 * 1024)
            .read_to_end(&mut sink)
            .map_err(|e| UpstreamError::Read(e).at_deadline(limit))?;
        Ok(())
    }

    /// Starts receiving a NAR from an absolute URL, to be done within `deadline` (see
    /// [`Deadlines::nar`]). `Ok(None)` when it is not there.
    pub fn nar(&self, url: &str, deadline: Duration) -> Result<Option<NarBody>, UpstreamError> {
        self.nar_with(url, deadline, None)
    }

    /// As [`Upstreams::nar`], from another replica (`url` is at its advertised address), which
    /// is sent `token` (`--cache-get-token`, shared by the fleet) as a bearer token if set. The
    /// upstreams' credentials never go to a replica: its origin is none of theirs.
    pub fn nar_from_replica(
        &self,
        url: &str,
        deadline: Duration,
        token: Option<&crate::auth::Secret>,
    ) -> Result<Option<NarBody>, UpstreamError> {
        self.nar_with(url, deadline, bearer(token))
    }

    fn nar_with(&self, url: &str, deadline: Duration, auth: Option<String>) -> Result<Option<NarBody>, UpstreamError> {
        // Harmonia and others can compress the transfer; asking for zstd costs nothing here
        // (it is undone below, before hashing) and saves upstream bandwidth.
        let mut headers = vec![("Accept-Encoding", "zstd")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let resp = self.get(url, &headers, deadline)?;
        match resp.status().as_u16() {
            200 => {}
            403 | 404 | 410 => return Ok(None),
            s => return Err(UpstreamError::Status(s)),
        }
        let header = |name: &str| {
            resp.headers().get(name).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string())
        };
        let content_length = header("content-length").and_then(|v| v.parse().ok());
        let encoding = content_encoding(&resp);
        let raw = Deadlined { inner: resp.into_body().into_reader(), until: None, limit: deadline };
        let (reader, decoded) = decode(raw, &encoding)?;
        Ok(Some(NarBody { reader, content_length, decoded }))
    }

    /// Asks for bytes `from..total` of the NAR at `url` (`Range: bytes=<from>-`), to finish a
    /// body that broke off: the answer must be exactly that rest ([`check_partial`]), sent
    /// without a `Content-Encoding` (none is asked for), within `deadline`. `Ok(None)` when it
    /// is not there.
    pub fn nar_rest(
        &self,
        url: &str,
        from: u64,
        total: u64,
        deadline: Duration,
    ) -> Result<Option<Box<dyn Read + Send>>, UpstreamError> {
        self.nar_rest_with(url, from, total, deadline, None)
    }

    /// As [`Upstreams::nar_rest`], from another replica, sent `token` as
    /// [`Upstreams::nar_from_replica`] does.
    pub fn nar_rest_from_replica(
        &self,
        url: &str,
        from: u64,
        total: u64,
        deadline: Duration,
        token: Option<&crate::auth::Secret>,
    ) -> Result<Option<Box<dyn Read + Send>>, UpstreamError> {
        self.nar_rest_with(url, from, total, deadline, bearer(token))
    }

    fn nar_rest_with(
        &self,
        url: &str,
        from: u64,
        total: u64,
        deadline: Duration,
        auth: Option<String>,
    ) -> Result<Option<Box<dyn Read + Send>>, UpstreamError> {
        // Through `get`, as every request: the origin's credentials, same-origin redirects only.
        let range = format!("bytes={from}-");
        let mut headers = vec![("Range", range.as_str()), ("Accept-Encoding", "identity")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let resp = self.get(url, &headers, deadline)?;
        let status = resp.status().as_u16();
        if matches!(status, 403 | 404 | 410) {
            return Ok(None);
        }
        if status != 200 && status != 206 && status != 416 {
            return Err(UpstreamError::Status(status));
        }
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let length = header("content-length").and_then(|v| v.parse().ok());
        check_partial(status, header("content-range"), length, &content_encoding(&resp), from, total)
            .map_err(UpstreamError::NotPartial)?;
        Ok(Some(Box::new(Deadlined { inner: resp.into_body().into_reader(), until: None, limit: deadline })))
    }
}

/// Whether an answer (`status`, its `Content-Range`, `Content-Length` and `Content-Encoding`)
/// to `Range: bytes=<from>-` for a file of `total` bytes is exactly bytes `from..total`
/// (RFC 9110 14.4): a 206 for `bytes <from>-<total-1>/<total>` (or `/*`), in no encoding.
pub fn check_partial(
    status: u16,
    content_range: Option<&str>,
    content_length: Option<u64>,
    encoding: &str,
    from: u64,
    total: u64,
) -> Result<(), NotPartial> {
    match status {
        206 => {}
        200 => return Err(NotPartial::WholeFile),
        _ => return Err(NotPartial::Unsatisfiable),
    }
    if !matches!(encoding, "" | "identity") {
        return Err(NotPartial::Encoded(encoding.to_string()));
    }
    let Some(range) = content_range else { return Err(NotPartial::Unsatisfiable) };
    let parsed = range.strip_prefix("bytes ").and_then(|r| {
        let (span, complete) = r.trim().split_once('/')?;
        let (first, last) = span.split_once('-')?;
        let complete = match complete {
            "*" => None,
            c => Some(c.parse::<u64>().ok()?),
        };
        Some((first.parse::<u64>().ok()?, last.parse::<u64>().ok()?, complete))
    });
    let Some((first, last, complete)) = parsed else { return Err(NotPartial::Unsatisfiable) };
    let right = first == from
        && last.checked_add(1) == Some(total)
        && complete.is_none_or(|c| c == total)
        && content_length.is_none_or(|n| n == total - from);
    if right {
        Ok(())
    } else {
        Err(NotPartial::OtherRange(format!("{range}, {} bytes", content_length.map_or("?".into(), |n| n.to_string()))))
    }
}

impl Upstreams {
    /// GET `url` with `headers`, following redirects on `url`'s own origin only (at most
    /// [`MAX_REDIRECTS`]); a followed redirect is logged with the URL that answered. The
    /// credentials of each URL's origin go with it, and only those. The whole exchange,
    /// redirects and body included, must be done within `deadline`.
    fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        deadline: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, UpstreamError> {
        let until = std::time::Instant::now() + deadline.min(LONGEST_DEADLINE);
        let mut current = url.to_string();
        // W3C trace context: the upstream sees the span this request is made under.
        let traceparent = crate::otel::current().map(|c| crate::otel::trace::traceparent(&c));
        for _ in 0..=MAX_REDIRECTS {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(UpstreamError::Deadline(deadline));
            }
            let mut req = self.agent.get(&current).config().timeout_global(Some(left)).build();
            if let Some(t) = &traceparent {
                req = req.header("traceparent", t);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let own = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
            if let Some(auth) = self.auth.for_url(&current).filter(|_| !own) {
                req = req.header("Authorization", auth.expose());
            }
            let resp = req.call().map_err(|e| UpstreamError::from(e).at_deadline(deadline))?;
            if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
                if current != url {
                    log::info!("upstream {url}: answered by {current} (redirected)");
                }
                return Ok(resp);
            }
            let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or("");
            current = follow_redirect(&current, location)?;
        }
        Err(UpstreamError::BadRedirect("more than 3 redirects"))
    }
}

/// The `Authorization` value for a replica's `--cache-get-token`.
fn bearer(token: Option<&crate::auth::Secret>) -> Option<String> {
    token.map(|t| format!("Bearer {}", t.expose()))
}

/// Where a redirect from `from` to `location` leads, if ncps may follow it: only to the same
/// origin. Absolute, absolute-path and relative `Location`s are understood.
pub fn follow_redirect(from: &str, location: &str) -> Result<String, UpstreamError> {
    use crate::url::origin;
    let location = location.trim();
    if location.is_empty() {
        return Err(UpstreamError::BadRedirect("no Location"));
    }
    let next = if location.contains("://") {
        location.to_string()
    } else if location.starts_with("//") {
        let scheme = from.split("://").next().unwrap_or("http");
        format!("{scheme}:{location}")
    } else if location.starts_with('/') {
        format!("{}{location}", origin(from))
    } else {
        let path = from.split('?').next().unwrap_or(from);
        let dir = &path[..path.rfind('/').map_or(path.len(), |i| i + 1)];
        format!("{dir}{location}")
    };
    if !origin(&next).eq_ignore_ascii_case(origin(from)) {
        return Err(UpstreamError::RedirectElsewhere(without_userinfo(&next)));
    }
    Ok(next)
}

/// `url` without any `user:password@` (which must not reach a log).
fn without_userinfo(url: &str) -> String {
    let after = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[after..].find('/').map_or(url.len(), |i| after + i);
    match url[after..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..after], &url[after + at + 1..]),
        None => url.to_string(),
    }
}

fn content_encoding(resp: &ureq::http::Response<ureq::Body>) -> String {
    resp.headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Undoes a `Content-Encoding` (zstd is the one Nix cache servers use). Returns the reader of
/// the decoded bytes and whether anything was undone.
fn decode(
    raw: impl Read + Send + 'static,
    encoding: &str,
) -> Result<(Box<dyn Read + Send>, bool), UpstreamError> {
    match encoding {
        "" | "identity" => Ok((Box::new(raw), false)),
        "zstd" => {
            let d = zstd::stream::read::Decoder::new(raw)
                .map_err(UpstreamError::Decoder)?;
            Ok((Box::new(d), true))
        }
        other => Err(UpstreamError::UnsupportedEncoding(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_nar_deadline_is_the_base_plus_its_size_at_the_minimum_rate_and_never_unbounded() {
        let d = Deadlines { narinfo: Duration::from_secs(15), nar_base: Duration::from_secs(60), nar_min_rate: 64 << 10 };
        assert_eq!(d.nar(0), Duration::from_secs(60));
        assert_eq!(d.nar(64 << 10), Duration::from_secs(61));
        assert_eq!(d.nar(1 << 30), Duration::from_secs(60 + 16384), "1 GiB at 64 KiB/s: 4.6 h");
        assert_eq!(d.nar(100), Duration::from_secs(60) + Duration::from_nanos(100 * 1_000_000_000 / 65536));
        assert_eq!(d.nar(u64::MAX), LONGEST_DEADLINE, "no size makes it unbounded");
        let slowest = Deadlines { nar_min_rate: 1, ..d };
        assert_eq!(slowest.nar(u64::MAX), LONGEST_DEADLINE);
        let zero = Deadlines { nar_min_rate: 0, ..d };
        assert_eq!(zero.nar(10), Duration::from_secs(70), "a rate of 0 (refused by the config) counts as 1 B/s");
        assert_eq!(d.nar_rest(1 << 20, 2 << 20), d.nar(1 << 20), "a resume gets the time of what is left");
        assert_eq!(d.nar_rest(5, 3), d.nar(0));
        assert_eq!(Deadlines::default(), d, "the documented defaults");
    }

    #[test]
    fn a_download_makes_real_progress_at_half_the_minimum_rate_or_more() {
        let d = Deadlines { nar_min_rate: 64 << 10, ..Deadlines::default() };
        let ten = Duration::from_secs(10);
        assert!(d.progressing(320 << 10, ten), "half of 64 KiB/s over 10 s");
        assert!(!d.progressing((320 << 10) - 1, ten));
        assert!(!d.progressing(5, ten), "a drip of a byte every 2 s");
        assert!(d.progressing(0, Duration::from_millis(999)), "too short a window says nothing");
    }

    #[test]
    fn a_request_past_its_deadline_is_an_outage_and_a_timeout_but_an_abandoned_one_is_neither() {
        let late = UpstreamError::from(ureq::Error::Timeout(ureq::Timeout::Global)).at_deadline(Duration::from_secs(15));
        assert!(matches!(late, UpstreamError::Deadline(d) if d == Duration::from_secs(15)), "{late}");
        assert!(late.is_outage() && late.is_timeout());
        assert_eq!(late.to_string(), "not done within its deadline of 15s");
        assert_eq!(UpstreamError::Deadline(Duration::from_nanos(3_000_000_279)).to_string(), "not done within its deadline of 3s");
        assert_eq!(UpstreamError::Deadline(Duration::from_millis(61_500)).to_string(), "not done within its deadline of 61.5s");
        let read = io::Error::other(ureq::Error::Timeout(ureq::Timeout::Global));
        assert!(matches!(UpstreamError::Read(read).at_deadline(Duration::from_secs(1)), UpstreamError::Deadline(_)));
        let idle = UpstreamError::from(ureq::Error::Timeout(ureq::Timeout::PerRead)).at_deadline(Duration::from_secs(1));
        assert!(matches!(idle, UpstreamError::Transport(_)), "an idle timeout stays what it is");
        assert!(!UpstreamError::Abandoned.is_outage() && !UpstreamError::Abandoned.is_timeout());
    }

    #[test]
    fn a_body_read_past_its_deadline_fails_as_a_timeout_with_the_deadline_said() {
        let mut r = within(Box::new(&b"abc"[..]), Duration::ZERO);
        let e = r.read(&mut [0u8; 4]).unwrap_err();
        assert!(io_timed_out(&e), "{e}");
        assert!(e.to_string().contains("deadline"), "{e}");
        let mut r = within(Box::new(&b"abc"[..]), Duration::from_secs(60));
        assert_eq!(r.read(&mut [0u8; 4]).unwrap(), 3);
    }

    #[test]
    fn only_unreachable_timing_out_or_5xx_upstreams_count_as_an_outage() {
        assert!(UpstreamError::Status(500).is_outage());
        assert!(UpstreamError::Status(503).is_outage());
        assert!(UpstreamError::Status(429).is_outage(), "rate limited: back off");
        assert!(!UpstreamError::Status(401).is_outage(), "it answered: a configuration problem, not an outage");
        assert!(!UpstreamError::TooLarge.is_outage());
        assert!(!UpstreamError::UnsupportedEncoding("br".into()).is_outage());
        assert!(UpstreamError::Read(io::Error::from(io::ErrorKind::ConnectionReset)).is_outage());
        assert!(UpstreamError::from(ureq::Error::ConnectionFailed).is_outage());
    }

    #[test]
    fn only_a_206_for_exactly_the_rest_in_no_encoding_continues_a_nar() {
        let ok = |cr: &str, len: Option<u64>| check_partial(206, Some(cr), len, "", 100, 1000);
        assert_eq!(ok("bytes 100-999/1000", Some(900)), Ok(()));
        assert_eq!(ok("bytes 100-999/*", None), Ok(()), "an unknown complete length is allowed");
        assert_eq!(check_partial(206, Some("bytes 100-999/1000"), None, "identity", 100, 1000), Ok(()));
        assert!(matches!(ok("bytes 0-999/1000", Some(1000)), Err(NotPartial::OtherRange(_))), "another start");
        assert!(matches!(ok("bytes 100-499/1000", Some(400)), Err(NotPartial::OtherRange(_))), "not to the end");
        assert!(matches!(ok("bytes 100-999/2000", Some(900)), Err(NotPartial::OtherRange(_))), "another file");
        assert!(matches!(ok("bytes 100-999/1000", Some(901)), Err(NotPartial::OtherRange(_))), "a length that disagrees");
        assert_eq!(ok("items 100-999/1000", None), Err(NotPartial::Unsatisfiable));
        assert_eq!(ok("bytes 100-/1000", None), Err(NotPartial::Unsatisfiable));
        assert_eq!(check_partial(206, None, Some(900), "", 100, 1000), Err(NotPartial::Unsatisfiable));
        assert_eq!(check_partial(200, None, Some(1000), "", 100, 1000), Err(NotPartial::WholeFile));
        assert_eq!(check_partial(416, Some("bytes */1000"), None, "", 100, 1000), Err(NotPartial::Unsatisfiable));
        assert_eq!(
            check_partial(206, Some("bytes 100-999/1000"), None, "zstd", 100, 1000),
            Err(NotPartial::Encoded("zstd".into()))
        );
        assert!(!UpstreamError::NotPartial(NotPartial::WholeFile).is_outage(), "it answered: not an outage");
    }

    #[test]
    fn redirects_are_followed_on_the_upstreams_own_origin_only() {
        let from = "http://up:1/cache/abc.narinfo";
        assert_eq!(follow_redirect(from, "/mirror/abc.narinfo").unwrap(), "http://up:1/mirror/abc.narinfo");
        assert_eq!(follow_redirect(from, "other.narinfo").unwrap(), "http://up:1/cache/other.narinfo");
        assert_eq!(follow_redirect(from, "http://UP:1/x").unwrap(), "http://UP:1/x");
        for elsewhere in ["http://up:2/x", "https://up:1/x", "http://evil/x", "//evil:1/x", "http://up:1@evil:1/x"] {
            let e = follow_redirect(from, elsewhere).unwrap_err();
            assert!(matches!(e, UpstreamError::RedirectElsewhere(_)), "{elsewhere}: {e}");
            assert!(!e.is_outage(), "an answer ncps does not accept is no outage");
        }
        let e = follow_redirect(from, "http://user:secret@evil:1/x").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(matches!(follow_redirect(from, ""), Err(UpstreamError::BadRedirect(_))));
    }

    #[test]
    fn timeouts_are_told_apart_however_ureq_wraps_them() {
        assert!(UpstreamError::from(ureq::Error::Timeout(ureq::Timeout::Connect)).is_timeout());
        assert!(UpstreamError::from(ureq::Error::Io(io::Error::from(io::ErrorKind::TimedOut))).is_timeout());
        // A body read past --upstream-body-idle-timeout: ureq's error inside an io::Error.
        let wrapped = io::Error::other(ureq::Error::Timeout(ureq::Timeout::PerRead));
        assert!(UpstreamError::Read(wrapped).is_timeout());
        assert!(!UpstreamError::Read(io::Error::from(io::ErrorKind::ConnectionReset)).is_timeout());
        assert!(!UpstreamError::from(ureq::Error::Io(io::Error::from(io::ErrorKind::ConnectionRefused))).is_timeout());
        assert!(!UpstreamError::Status(504).is_timeout(), "an upstream's own 504 is its answer, not our timeout");
    }
}
