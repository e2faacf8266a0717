//! OpenTelemetry: traces, metrics and logs over OTLP, with an exporter of our own.
//!
//! Why not the opentelemetry crates: OTLP over gRPC with them means tonic, hyper, h2 and a
//! tokio runtime; a program that only sets up their three exporters is 1.39 MB stripped
//! (against 0.29 MB for an empty one), which would take the x86_64 static binary from 4.20
//! to about 5.3 MB, over the 5 MiB budget, and add a runtime to a server that has none.
//! What ncps needs of OTLP is small (DESIGN.md, "OpenTelemetry"): a dozen protobuf messages
//! written by hand ([`proto`]), a POST over the ureq ncps already has for HTTP/protobuf, and
//! for gRPC one unary call at a time over HTTP/2, cleartext or over the rustls ureq links
//! anyway ([`h2`]).
//!
//! Parts:
//! - [`trace`]: span ids, `traceparent`, the spans open on each thread;
//! - [`export`]: the exporter thread and its bounded queue: nothing on the request path
//!   waits for a collector, and a collector that is down costs dropped telemetry, counted;
//! - [`proto`], [`json`]: OTLP protobuf, and OTLP/JSON lines for stdout;
//! - [`metrics`]: the `/metrics` text read back as OTLP metrics;
//! - [`h2`], [`huffman`]: gRPC over cleartext HTTP/2.

pub mod export;
pub mod h2;
pub mod huffman;
pub mod json;
pub mod metrics;
pub mod proto;
pub mod trace;

pub use trace::{attr, current, link, request_span, span};

use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whether telemetry is on: read (relaxed) by every hook, so that with it off each costs
/// one load and a branch.
pub(crate) static ENABLED: AtomicBool = AtomicBool::new(false);

pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    F64(f64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Value {
        Value::Str(s.clone())
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v.min(i64::MAX as u64) as i64)
    }
}
impl From<u16> for Value {
    fn from(v: u16) -> Value {
        Value::Int(v as i64)
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Int(v as i64)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::F64(v)
    }
}

/// The OTLP resource: who is reporting (`service.name` and the rest).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resource {
    pub attributes: Vec<(String, String)>,
}

// What is exported: spans (recorded by `trace`), log records and metrics (`metrics`), each
// in the shape the encoders (`json`, `proto`) take. Here, below all of them, so that the
// exporter and the encoders need nothing of the code that records.

/// Where a span sits: its trace and its own id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

/// OTLP `SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// A finished (or open) span, as exported.
#[derive(Clone, Debug)]
pub struct SpanData {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    pub name: std::borrow::Cow<'static, str>,
    pub kind: SpanKind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attrs: Vec<(&'static str, Value)>,
    pub links: Vec<SpanContext>,
    /// Set for a span whose work failed: OTLP status ERROR with this message.
    pub error: Option<String>,
}

/// Wall-clock time in nanoseconds since the Unix epoch, as OTLP stamps spans and logs.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Appends `bytes` in lower-case hex: ids as `traceparent` and the OTLP JSON mapping write them.
pub(crate) fn hex_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    hex_into(&mut s, bytes);
    s
}

/// A log line as an OTLP log record.
#[derive(Clone, Debug)]
pub struct LogData {
    pub time_ns: u64,
    pub level: log::Level,
    pub body: String,
    /// The span open on the thread that logged it.
    pub span: Option<SpanContext>,
}

/// Where telemetry goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// OTLP/JSON lines on stdout.
    Stdout,
    /// OTLP/HTTP with protobuf bodies: POSTs to `<base>/v1/traces` and so on.
    HttpProtobuf { base: String },
    /// OTLP/gRPC to `http://host:port` (cleartext HTTP/2) or `https://host:port` (TLS).
    Grpc { url: String },
}

/// What `--otel-*` and the `OTEL_*` variables say (checked in config.rs).
#[derive(Clone, Debug, PartialEq)]
pub struct OtelSettings {
    pub destination: Destination,
    pub resource: Resource,
    pub metric_interval: Duration,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: sent with every export (names lower-case). Never logged.
    pub headers: Headers,
}

/// Export headers; their values (tokens, usually) never print.
#[derive(Clone, Default, PartialEq)]
pub struct Headers(pub Vec<(String, String)>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(k, _)| format!("{k}: <redacted>"))).finish()
    }
}

impl OtelSettings {
    /// Where to, for the start-up log line.
    pub fn describe(&self) -> String {
        match &self.destination {
            Destination::Stdout => "OTLP/JSON lines on stdout".to_string(),
            Destination::HttpProtobuf { base } => format!("OTLP/HTTP (protobuf) to {base}"),
            Destination::Grpc { url } => format!("OTLP/gRPC to {url}"),
        }
    }
}

/// Reads `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`, values percent-encoded) and the service
/// name into the resource; `service.name` from `OTEL_SERVICE_NAME` wins over one in the list.
///
/// ```
/// let r = ncps::otel::resource(Some("deployment.environment=lab,team=a%2Cb"), None);
/// assert!(r.attributes.contains(&("team".to_string(), "a,b".to_string())));
/// assert!(r.attributes.contains(&("service.name".to_string(), "ncps".to_string())));
/// ```
pub fn resource(attributes: Option<&str>, service_name: Option<&str>) -> Resource {
    let mut attrs: Vec<(String, String)> = Vec::new();
    for pair in attributes.unwrap_or("").split(',') {
        let Some((k, v)) = pair.split_once('=') else { continue };
        let (k, v) = (k.trim(), percent_decode(v.trim()));
        if k.is_empty() {
            continue;
        }
        attrs.retain(|(x, _)| x != k);
        attrs.push((k.to_string(), v));
    }
    let name = service_name
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| attrs.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone()))
        .unwrap_or_else(|| "ncps".to_string());
    attrs.retain(|(k, _)| k != "service.name" && k != "service.version");
    attrs.insert(0, ("service.name".to_string(), name));
    attrs.insert(1, ("service.version".to_string(), env!("CARGO_PKG_VERSION").to_string()));
    Resource { attributes: attrs }
}

/// Reads `OTEL_EXPORTER_OTLP_HEADERS` (`k=v,k2=v2`, values percent-encoded). Names must be
/// HTTP tokens and values printable, since they go into HTTP/1.1 and HPACK as they are.
///
/// ```
/// let h = ncps::otel::headers(Some("Authorization=Bearer%20abc, x-scope=lab")).unwrap();
/// assert_eq!(h, vec![("authorization".into(), "Bearer abc".into()), ("x-scope".into(), "lab".into())]);
/// assert!(ncps::otel::headers(Some("bad name=1")).is_err());
/// ```
pub fn headers(list: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in list.unwrap_or("").split(',').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else { return Err(format!("{pair:?}: expected key=value")) };
        let k = k.trim().to_ascii_lowercase();
        let v = percent_decode(v.trim());
        let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if k.is_empty() || !k.chars().all(token) || k.starts_with(':') {
            return Err(format!("{k:?} is not a header name"));
        }
        if v.chars().any(|c| c.is_control()) {
            return Err(format!("the value of {k} has control characters"));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finishes the attributes of a request span (the HTTP server calls this once the answer
/// is sent): what was asked, by whom, and how it was answered.
#[allow(clippy::too_many_arguments)]
pub fn request_done(
    span: &trace::Guard,
    method: &str,
    path: &str,
    peer: std::net::IpAddr,
    status: u16,
    bytes: u64,
    note: &str,
    upstream: Option<&str>,
) {
    if !enabled() {
        return;
    }
    span.set("http.request.method", method);
    span.set("url.path", path);
    span.set("client.address", peer.to_string());
    span.set("http.response.status_code", status);
    span.set("http.response.body.size", bytes);
    if !note.is_empty() {
        span.set("ncps.cache.result", note);
    }
    if let Some(u) = upstream.filter(|u| !u.is_empty()) {
        span.set("ncps.upstream", shown_url(u));
    }
    if status >= 500 {
        span.fail(format!("HTTP {status}"));
    }
}

/// A URL as telemetry shows it: without user, password or query (what `/metrics` labels do).
pub fn shown_url(url: &str) -> String {
    crate::url::without_secrets(url)
}

/// Names the request span after its route (`GET /nar/{name}`), and says the route.
pub fn route(method: &str, template: &'static str) {
    if !enabled() {
        return;
    }
    trace::rename(format!("{method} {template}"));
    attr("http.route", template);
}

/// Called by the logger for each line it writes: the line as a log record, with the ids of
/// the span open on this thread.
pub fn log_line(level: log::Level, body: String) {
    if !enabled() {
        return;
    }
    export::submit_log(LogData { time_ns: now_ns(), level, body, span: trace::current() });
}
