//! The exporter thread: the only place that talks to a collector.
//!
//! Spans and log records reach it through a bounded channel ([`QUEUE`] items) with
//! `try_send`: a request never waits, and when the channel is full the item is dropped and
//! counted. The thread keeps at most [`PENDING`] of each kind waiting to be sent (the oldest
//! go first when more arrive), sends them in batches of up to [`BATCH`] a second after the
//! first arrived, and after a failed export waits (1 s, doubling to 30 s) before trying
//! again, so a collector that is down costs one connection attempt per back-off period and
//! bounded memory, and what was kept goes out when it is back. Metrics are read every
//! export interval and sent once (a cumulative figure lost is superseded by the next).
//! Idle, the thread wakes once per metric interval.

use super::metrics::from_prometheus;
use super::{json, now_ns, proto, Destination, LogData, OtelSettings, Resource, SpanData};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Items the channel holds before new ones are dropped.
pub const QUEUE: usize = 4096;
/// Spans (and, separately, log records) the thread keeps while the collector is away.
pub const PENDING: usize = 8192;
/// Items per export request.
pub const BATCH: usize = 512;
/// How long the first item of a batch waits for company.
const FLUSH_DELAY: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a collector that keeps failing is complained about in the log.
const COMPLAIN_EVERY: Duration = Duration::from_secs(60);
/// Connect and whole-request timeouts for one export.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

enum Item {
    Span(SpanData),
    Log(LogData),
    Flush(SyncSender<()>),
}

static QUEUE_TX: OnceLock<SyncSender<Item>> = OnceLock::new();

/// What telemetry was lost or failed, for `/metrics`.
#[derive(Default)]
pub struct Stats {
    pub dropped_spans: AtomicU64,
    pub dropped_logs: AtomicU64,
    pub dropped_metrics: AtomicU64,
    pub exported_spans: AtomicU64,
    pub exported_logs: AtomicU64,
    pub exported_metrics: AtomicU64,
    pub failed_exports: AtomicU64,
}

pub static STATS: Stats = Stats {
    dropped_spans: AtomicU64::new(0),
    dropped_logs: AtomicU64::new(0),
    dropped_metrics: AtomicU64::new(0),
    exported_spans: AtomicU64::new(0),
    exported_logs: AtomicU64::new(0),
    exported_metrics: AtomicU64::new(0),
    failed_exports: AtomicU64::new(0),
};

pub(super) fn submit_span(s: SpanData) {
    if let Some(tx) = QUEUE_TX.get() {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(Item::Span(s)) {
            STATS.dropped_spans.fetch_add(1, Relaxed);
        }
    }
}

pub(super) fn submit_log(l: LogData) {
    if let Some(tx) = QUEUE_TX.get() {
        if tx.try_send(Item::Log(l)).is_err() {
            STATS.dropped_logs.fetch_add(1, Relaxed);
        }
    }
}

/// A failed export.
#[derive(Debug)]
#[non_exhaustive]
pub enum ExportError {
    /// Not reached, timed out, or answered 5xx/429/UNAVAILABLE: tried again later.
    Transient(String),
    /// Refused for good (a 4xx, a gRPC status other than UNAVAILABLE): the batch is dropped.
    Refused(String),
}

impl std::fmt::Display for ExportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportError::Transient(why) => write!(f, "{why}"),
            ExportError::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

impl std::error::Error for ExportError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    pub fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }
    pub fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        }
    }
}

/// Where batches go, and how they are encoded.
enum Sink {
    Stdout,
    Http { agent: ureq::Agent, base: String, headers: Vec<(String, String)> },
    Grpc(super::h2::GrpcClient),
}

impl Sink {
    fn new(d: &Destination, headers: &[(String, String)]) -> Sink {
        match d {
            Destination::Stdout => Sink::Stdout,
            Destination::HttpProtobuf { base } => {
                let agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_connect(Some(CONNECT_TIMEOUT))
                    .timeout_global(Some(REQUEST_TIMEOUT))
                    .user_agent(concat!("ncps/", env!("CARGO_PKG_VERSION")))
                    .max_idle_connections_per_host(1)
                    .build()
                    .new_agent();
                Sink::Http { agent, base: base.trim_end_matches('/').to_string(), headers: headers.to_vec() }
            }
            Destination::Grpc { url } => {
                let timeouts = super::h2::Timeouts { connect: CONNECT_TIMEOUT, call: REQUEST_TIMEOUT };
                Sink::Grpc(super::h2::GrpcClient::new(url, headers.to_vec(), timeouts))
            }
        }
    }

    fn send(&mut self, signal: Signal, proto: impl FnOnce() -> Vec<u8>, json: impl FnOnce() -> String) -> Result<(), ExportError> {
        match self {
            Sink::Stdout => {
                let mut line = json();
                line.push('\n');
                std::io::stdout().lock().write_all(line.as_bytes()).map_err(|e| ExportError::Transient(format!("stdout: {e}")))
            }
            Sink::Http { agent, base, headers } => {
                let url = format!("{base}{}", signal.http_path());
                let body = proto();
                let mut req = agent.post(&url).header("Content-Type", "application/x-protobuf");
                for (k, v) in headers.iter() {
                    req = req.header(k.as_str(), v.as_str());
                }
                let resp = req
                    .send(&body[..])
                    .map_err(|e| ExportError::Transient(format!("{url}: {e}")))?;
                match resp.status().as_u16() {
                    200..=299 => Ok(()),
                    s @ (429 | 502 | 503 | 504) => Err(ExportError::Transient(format!("{url}: HTTP {s}"))),
                    s => Err(ExportError::Refused(format!("{url}: HTTP {s}"))),
                }
            }
            Sink::Grpc(client) => client.unary(signal.grpc_path(), &proto()).map_err(|e| match e.retryable {
                true => ExportError::Transient(e.why),
                false => ExportError::Refused(e.why),
            }),
        }
    }
}

/// Reads the `/metrics` text, or `None` when the figures cannot be read just now.
pub type MetricsSource = Box<dyn Fn() -> Option<String> + Send>;

/// Starts the exporter thread and turns the hooks on. Call once.
pub fn start(settings: OtelSettings, metrics: MetricsSource) -> std::io::Result<()> {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    if QUEUE_TX.set(tx).is_err() {
        return Ok(());
    }
    std::thread::Builder::new().name("otel".into()).spawn(move || Exporter::new(settings, metrics).run(rx))?;
    super::ENABLED.store(true, Relaxed);
    Ok(())
}

/// Sends what is waiting, waiting at most `timeout` (at exit).
pub fn flush(timeout: Duration) {
    let Some(tx) = QUEUE_TX.get() else { return };
    let (done_tx, done) = mpsc::sync_channel(1);
    if tx.try_send(Item::Flush(done_tx)).is_ok() {
        let _ = done.recv_timeout(timeout);
    }
}

struct Exporter {
    sink: Sink,
    resource: Resource,
    interval: Duration,
    metrics: MetricsSource,
    spans: VecDeque<SpanData>,
    logs: VecDeque<LogData>,
    /// When the oldest item waiting arrived.
    since: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    start_ns: u64,
    last_complaint: Option<Instant>,
    /// Drops counted at the last complaint.
    dropped_seen: u64,
    /// The last export failed (said once it works again).
    failing: bool,
}

fn dropped_total() -> u64 {
    STATS.dropped_spans.load(Relaxed) + STATS.dropped_logs.load(Relaxed) + STATS.dropped_metrics.load(Relaxed)
}

impl Exporter {
    fn new(settings: OtelSettings, metrics: MetricsSource) -> Exporter {
        Exporter {
            sink: Sink::new(&settings.destination, &settings.headers.0),
            resource: settings.resource,
            interval: settings.metric_interval,
            metrics,
            spans: VecDeque::new(),
            logs: VecDeque::new(),
            since: None,
            retry_at: None,
            backoff: Duration::from_secs(1),
            start_ns: now_ns(),
            last_complaint: None,
            dropped_seen: 0,
            failing: false,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Item>) {
        let mut next_metrics = Instant::now() + self.interval;
        loop {
            let now = Instant::now();
            let mut wake = next_metrics;
            if let Some(since) = self.since {
                wake = wake.min(self.retry_at.unwrap_or(since + FLUSH_DELAY).max(since + FLUSH_DELAY));
            }
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Item::Span(s)) => self.keep_span(s),
                Ok(Item::Log(l)) => self.keep_log(l),
                Ok(Item::Flush(done)) => {
                    // Take what else is queued, then send it all, ignoring the back-off.
                    while let Ok(item) = rx.try_recv() {
                        match item {
                            Item::Span(s) => self.keep_span(s),
                            Item::Log(l) => self.keep_log(l),
                            Item::Flush(d) => drop(d),
                        }
                    }
                    self.retry_at = None;
                    while (!self.spans.is_empty() || !self.logs.is_empty()) && self.retry_at.is_none() {
                        self.send_batches();
                    }
                    self.export_metrics();
                    let _ = done.send(());
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            let full = self.spans.len() >= BATCH || self.logs.len() >= BATCH;
            let due = self.since.is_some_and(|s| now >= s + FLUSH_DELAY) || full;
            if due && self.retry_at.is_none_or(|r| now >= r) {
                self.send_batches();
            }
            if now >= next_metrics {
                self.export_metrics();
                next_metrics = now + self.interval;
            }
            self.tell_drops();
        }
    }

    /// Drops while the collector takes what is sent (the queue overflowed: more telemetry
    /// than one exporter thread sends) are said too, at most once a minute.
    fn tell_drops(&mut self) {
        if self.last_complaint.is_some_and(|t| t.elapsed() < COMPLAIN_EVERY) || self.retry_at.is_some() {
            return;
        }
        let dropped = dropped_total();
        if dropped > self.dropped_seen {
            log::warn!(
                "otel: {} spans, log records or metrics dropped: more telemetry than the exporter sends \
                 (queue of {QUEUE} full); {dropped} dropped so far",
                dropped - self.dropped_seen
            );
            self.dropped_seen = dropped;
            self.last_complaint = Some(Instant::now());
        }
    }

    fn keep_span(&mut self, s: SpanData) {
        if self.spans.len() >= PENDING {
            self.spans.pop_front();
            STATS.dropped_spans.fetch_add(1, Relaxed);
        }
        self.spans.push_back(s);
        self.since.get_or_insert_with(Instant::now);
    }

    fn keep_log(&mut self, l: LogData) {
        if self.logs.len() >= PENDING {
            self.logs.pop_front();
            STATS.dropped_logs.fetch_add(1, Relaxed);
        }
        self.logs.push_back(l);
        self.since.get_or_insert_with(Instant::now);
    }

    /// Sends everything waiting, a batch at a time, until done or an export fails.
    fn send_batches(&mut self) {
        while !self.spans.is_empty() {
            let n = self.spans.len().min(BATCH);
            // Encoded from where they wait (no copy); taken out once the collector has them.
            let (r, b) = (&self.resource, &self.spans.make_contiguous()[..n]);
            let result = self.sink.send(Signal::Traces, || proto::traces(r, b), || json::traces(r, b));
            if !self.settle(result, n, &STATS.exported_spans, &STATS.dropped_spans) {
                return;
            }
            self.spans.drain(..n);
        }
        while !self.logs.is_empty() {
            let n = self.logs.len().min(BATCH);
            let (r, b) = (&self.resource, &self.logs.make_contiguous()[..n]);
            let result = self.sink.send(Signal::Logs, || proto::logs(r, b), || json::logs(r, b));
            if !self.settle(result, n, &STATS.exported_logs, &STATS.dropped_logs) {
                return;
            }
            self.logs.drain(..n);
        }
        self.since = None;
    }

    /// Accounts for one export; true when the batch is done with (sent, or refused for good).
    fn settle(&mut self, result: Result<(), ExportError>, n: usize, exported: &AtomicU64, dropped: &AtomicU64) -> bool {
        match result {
            Ok(()) => {
                exported.fetch_add(n as u64, Relaxed);
                self.retry_at = None;
                self.recovered();
                self.backoff = Duration::from_secs(1);
                true
            }
            Err(e @ ExportError::Refused(_)) => {
                self.failing = true;
                STATS.failed_exports.fetch_add(1, Relaxed);
                dropped.fetch_add(n as u64, Relaxed);
                self.complain(&e);
                true
            }
            Err(e) => {
                self.failing = true;
                STATS.failed_exports.fetch_add(1, Relaxed);
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.complain(&e);
                false
            }
        }
    }

    /// After failures, an export worked: said once.
    fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            let lost = dropped_total() - self.dropped_seen;
            log::info!("otel: the collector takes telemetry again ({lost} items dropped meanwhile)");
            self.last_complaint = None;
            self.dropped_seen = dropped_total();
        }
    }

    /// A warning now and then, not per failure: the log may itself be exported.
    fn complain(&mut self, e: &ExportError) {
        if self.last_complaint.is_some_and(|t| t.elapsed() < COMPLAIN_EVERY) {
            return;
        }
        self.last_complaint = Some(Instant::now());
        let dropped = dropped_total();
        log::warn!(
            "otel: export failed: {e}; telemetry waits (at most {PENDING} spans and {PENDING} log records), \
             {} items dropped so far",
            dropped
        );
        self.dropped_seen = dropped;
    }

    fn export_metrics(&mut self) {
        let Some(text) = (self.metrics)() else { return };
        let metrics = from_prometheus(&text);
        let (r, m, start, now) = (&self.resource, &metrics, self.start_ns, now_ns());
        // Sent even while spans are backing off: metrics are one request a minute, and the
        // attempt is how a collector that came back is noticed.
        let result = self.sink.send(Signal::Metrics, || proto::metrics(r, m, start, now), || json::metrics(r, m, start, now));
        match result {
            Ok(()) => {
                STATS.exported_metrics.fetch_add(metrics.len() as u64, Relaxed);
                if self.retry_at.is_some() {
                    self.retry_at = Some(Instant::now());
                }
                self.recovered();
            }
            Err(e) => {
                self.failing = true;
                STATS.failed_exports.fetch_add(1, Relaxed);
                STATS.dropped_metrics.fetch_add(metrics.len() as u64, Relaxed);
                self.complain(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::otel::{SpanContext, SpanKind};

    fn span() -> SpanData {
        SpanData {
            context: SpanContext { trace_id: [1; 16], span_id: [2; 8] },
            parent: None,
            name: "s".into(),
            kind: SpanKind::Internal,
            start_ns: 1,
            end_ns: 2,
            attrs: Vec::new(),
            links: Vec::new(),
            error: None,
        }
    }

    fn exporter() -> Exporter {
        let settings = OtelSettings {
            // Nothing listens on port 1: every export fails at once.
            destination: Destination::Grpc { url: "http://127.0.0.1:1".into() },
            resource: Resource::default(),
            metric_interval: Duration::from_secs(60),
            headers: Default::default(),
        };
        Exporter::new(settings, Box::new(|| None))
    }

    #[test]
    fn what_waits_for_the_collector_is_bounded_and_the_oldest_goes_first() {
        let mut e = exporter();
        let before = STATS.dropped_spans.load(Relaxed);
        for i in 0..PENDING + 10 {
            let mut s = span();
            s.start_ns = i as u64;
            e.keep_span(s);
        }
        assert_eq!(e.spans.len(), PENDING);
        assert_eq!(e.spans.front().map(|s| s.start_ns), Some(10), "the oldest were dropped");
        assert!(STATS.dropped_spans.load(Relaxed) >= before + 10, "and counted");
    }

    #[test]
    fn a_collector_that_is_down_keeps_the_batch_and_backs_off_and_one_that_refuses_drops_it() {
        let mut e = exporter();
        e.keep_span(span());
        e.send_batches();
        assert_eq!(e.spans.len(), 1, "kept for the next attempt");
        let first = e.retry_at.expect("a retry time");
        assert!(first > Instant::now());
        assert_eq!(e.backoff, Duration::from_secs(2));
        let dropped = STATS.dropped_logs.load(Relaxed);
        assert!(e.settle(Err(ExportError::Refused("400".into())), 3, &STATS.exported_logs, &STATS.dropped_logs));
        assert!(STATS.dropped_logs.load(Relaxed) >= dropped + 3);
    }

    #[test]
    fn drops_while_the_collector_is_fine_are_said_at_most_once_a_minute() {
        let mut e = exporter();
        STATS.dropped_spans.fetch_add(5, Relaxed);
        e.tell_drops();
        let said = e.last_complaint.expect("said");
        assert!(e.dropped_seen >= 5, "what was said is remembered");
        STATS.dropped_spans.fetch_add(5, Relaxed);
        e.tell_drops();
        assert_eq!(e.last_complaint, Some(said), "not again within a minute");
    }
}
