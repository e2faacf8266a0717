//! Talking to upstream caches: a blocking HTTP client with every timeout set.
//!
//! An upstream is never trusted to be up, fast or honest. Connecting, waiting for headers and
//! waiting for each piece of a body all have limits (a stalled upstream must not hold a worker
//! or a download forever), and the caller checks every byte that comes back.
//!
//! Redirects are followed by hand, only on the upstream's own origin (scheme, host and port)
//! and at most [`MAX_REDIRECTS`] times: an upstream must not make ncps send requests to any
//! other host or port on the LAN, nor receive its credentials. A redirect elsewhere is an
//! error that names where it pointed ([`UpstreamError::RedirectElsewhere`]).

use crate::config::UpstreamConfig;
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
            UpstreamError::Transport(_) | UpstreamError::Read(_) => true,
            UpstreamError::TooLarge
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
            _ => false,
        }
    }
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
}

impl Upstreams {
    pub fn new(settings: UpstreamSettings) -> Upstreams {
        let UpstreamSettings { auth, list, dial_timeout: dial, header_timeout: header, body_idle_timeout: body_idle } =
            settings;
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(root_certs())))
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
        Upstreams { list, agent, auth }
    }

    /// The origins ncps has credentials for (never the credentials).
    pub fn credential_origins(&self) -> Vec<String> {
        self.auth.origins().map(str::to_string).collect()
    }

    pub fn list(&self) -> &[UpstreamConfig] {
        &self.list
    }

    /// Fetches `<upstream>/<hash>.narinfo`. `Ok(None)` when the upstream says it has no such
    /// path (404, 403 and 410 mean that in Nix's protocol).
    pub fn narinfo(
        &self,
        upstream: &UpstreamConfig,
        hash: &StorePathHash,
    ) -> Result<Option<Vec<u8>>, UpstreamError> {
        let url = format!("{}/{hash}.narinfo", upstream.url);
        let resp = self.get(&url, &[])?;
        match resp.status().as_u16() {
            200 => {}
            403 | 404 | 410 => return Ok(None),
            s => return Err(UpstreamError::Status(s)),
        }
        let limit = MAX_NARINFO_BYTES as u64 + 1;
        let mut body = Vec::new();
        // Not asked for, but some servers compress every response; the limit applies to the
        // decoded text, so a small, highly compressed body cannot grow without bound.
        let encoding = content_encoding(&resp);
        let (reader, _) = decode(resp.into_body().into_reader(), &encoding)?;
        reader
            .take(limit)
            .read_to_end(&mut body)
            .map_err(UpstreamError::Read)?;
        if body.len() as u64 >= limit {
            return Err(UpstreamError::TooLarge);
        }
        Ok(Some(body))
    }

    /// Asks for `<upstream>/nix-cache-info`: whether the upstream answers at all (the probe of
    /// an upstream marked down). Any answer but a 5xx or 429 counts: a server without that
    /// file is still up.
    pub fn cache_info(&self, upstream: &UpstreamConfig) -> Result<(), UpstreamError> {
        let url = format!("{}/nix-cache-info", upstream.url);
        let resp = self.get(&url, &[])?;
        let e = UpstreamError::Status(resp.status().as_u16());
        if e.is_outage() {
            return Err(e);
        }
        // Read (a few bytes at most), so the connection can be used again.
        let mut sink = Vec::new();
        resp.into_body().into_reader().take(64 * 1024).read_to_end(&mut sink).map_err(UpstreamError::Read)?;
        Ok(())
    }

    /// Starts receiving a NAR from an absolute URL. `Ok(None)` when it is not there.
    pub fn nar(&self, url: &str) -> Result<Option<NarBody>, UpstreamError> {
        // Harmonia and others can compress the transfer; asking for zstd costs nothing here
        // (it is undone below, before hashing) and saves upstream bandwidth.
        let resp = self.get(url, &[("Accept-Encoding", "zstd")])?;
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
        let (reader, decoded) = decode(resp.into_body().into_reader(), &encoding)?;
        Ok(Some(NarBody { reader, content_length, decoded }))
    }

    /// Asks for bytes `from..total` of the NAR at `url` (`Range: bytes=<from>-`), to finish a
    /// body that broke off: the answer must be exactly that rest ([`check_partial`]), sent
    /// without a `Content-Encoding` (none is asked for). `Ok(None)` when it is not there.
    pub fn nar_rest(&self, url: &str, from: u64, total: u64) -> Result<Option<Box<dyn Read + Send>>, UpstreamError> {
        // Through `get`, as every request: the origin's credentials, same-origin redirects only.
        let range = format!("bytes={from}-");
        let resp = self.get(url, &[("Range", range.as_str()), ("Accept-Encoding", "identity")])?;
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
        Ok(Some(Box::new(resp.into_body().into_reader())))
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
    /// credentials of each URL's origin go with it, and only those.
    fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<ureq::http::Response<ureq::Body>, UpstreamError> {
        let mut current = url.to_string();
        // W3C trace context: the upstream sees the span this request is made under.
        let traceparent = crate::otel::current().map(|c| crate::otel::trace::traceparent(&c));
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.agent.get(&current);
            if let Some(t) = &traceparent {
                req = req.header("traceparent", t);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(auth) = self.auth.for_url(&current) {
                req = req.header("Authorization", auth.expose());
            }
            let resp = req.call()?;
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

/// Mozilla's roots as bundled, plus the system's when it has a bundle, so that a device with
/// no CA package still works and a LAN with its own CA (added to the system store) works too.
/// `SSL_CERT_FILE`, when set, names the bundle to add instead of the system's, as it does for
/// the Go ncps (and OpenSSL, curl, Nix): a private CA need not be installed system-wide.
pub(crate) fn root_certs() -> Vec<ureq::tls::Certificate<'static>> {
    let mut certs: Vec<ureq::tls::Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()))
        .collect();
    let from_env = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let candidates = match &from_env {
        Some(p) => vec![p.clone()],
        None => ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
            .iter()
            .map(std::path::PathBuf::from)
            .collect(),
    };
    for path in candidates {
        match std::fs::read(&path) {
            Ok(pem) => {
                let before = certs.len();
                for item in ureq::tls::parse_pem(&pem).flatten() {
                    if let ureq::tls::PemItem::Certificate(c) = item {
                        certs.push(c.to_owned());
                    }
                }
                match certs.len() - before {
                    _ if from_env.is_none() => {}
                    0 => log::warn!(
                        "SSL_CERT_FILE={}: no PEM certificate in it; HTTPS upstreams are checked against the bundled roots only",
                        path.display()
                    ),
                    n => log::info!("trusting {n} certificate(s) from SSL_CERT_FILE={}", path.display()),
                }
                break;
            }
            Err(e) if from_env.is_some() => {
                log::warn!("SSL_CERT_FILE={}: {e}; HTTPS upstreams are checked against the bundled roots only", path.display());
            }
            Err(_) => {}
        }
    }
    certs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

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
