//! Log lines on stderr: `2026-11-25T12:00:00Z INFO  message`, one per event.
//!
//! A small logger of our own rather than env_logger, for one reason measured in
//! bench/RESULTS.md: writing each request's line with its own write(2) halved the narinfo
//! hit rate (74k → 39k requests/s on 2 cores). Lines at info and below are collected in a
//! buffer that a background thread writes out every 50 ms (or sooner when 64 KiB pile up);
//! warnings and errors are written at once, with everything before them, so the order of
//! lines is kept and nothing important waits. Timestamps are UTC; under systemd the journal
//! adds its own.

use std::io::Write;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const FLUSH_EVERY: Duration = Duration::from_millis(50);
const FLUSH_AT_BYTES: usize = 64 * 1024;

struct Logger {
    level: log::LevelFilter,
    buf: Mutex<Vec<u8>>,
    full: Condvar,
}

static LOGGER: std::sync::OnceLock<Logger> = std::sync::OnceLock::new();

impl Logger {
    fn flush_now(&self, buf: &mut Vec<u8>) {
        if !buf.is_empty() {
            // Nowhere to report a failed write to stderr; the line is dropped.
            let _ = std::io::stderr().lock().write_all(buf);
            buf.clear();
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= self.level && meta.level() <= ceiling(meta.target())
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if crate::otel::enabled() {
            // The same line as an OTLP log record, with the ids of the span it belongs to.
            crate::otel::log_line(record.level(), record.args().to_string());
        }
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(buf, "{} {:<5} {}", utc_now(), record.level(), record.args());
        if record.level() <= log::Level::Warn {
            self.flush_now(&mut buf);
        } else if buf.len() >= FLUSH_AT_BYTES {
            self.full.notify_one();
        }
    }

    fn flush(&self) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_now(&mut buf);
    }
}

/// The most a crate of ours depends on may log, whatever `--log-level` says. The HTTP client
/// and TLS stack are chatty below info; their news is in our own lines. The PostgreSQL driver
/// (`postgres`, `tokio_postgres`, `postgres_protocol`…) logs every statement and its
/// parameters at debug and its connection's chatter at info: only its warnings are kept, so
/// that `--log-level debug` stays readable and shows no parameter values.
fn ceiling(target: &str) -> log::Level {
    let crate_name = target.split("::").next().unwrap_or(target);
    match crate_name {
        c if c.starts_with("ureq") || c.starts_with("rustls") => log::Level::Info,
        c if c.starts_with("postgres") || c == "tokio_postgres" || c == "tokio_rustls" => log::Level::Warn,
        _ => log::Level::Trace,
    }
}

/// Installs the logger (once; later calls keep the first) and starts its writer thread.
pub fn init(level: log::LevelFilter) {
    let mut first = false;
    let logger = LOGGER.get_or_init(|| {
        first = true;
        Logger { level, buf: Mutex::new(Vec::with_capacity(FLUSH_AT_BYTES)), full: Condvar::new() }
    });
    if !first {
        return;
    }
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    let _ = std::thread::Builder::new().name("log".into()).spawn(move || loop {
        let buf = logger.buf.lock().unwrap_or_else(|p| p.into_inner());
        let (mut buf, _) = logger.full.wait_timeout(buf, FLUSH_EVERY).unwrap_or_else(|p| p.into_inner());
        logger.flush_now(&mut buf);
    });
}

/// Writes out buffered lines; call before the process exits.
pub fn flush() {
    log::logger().flush();
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`. Formatted once a second per thread: a busy
/// server logs thousands of lines within the same second.
pub fn utc_now() -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != secs {
            *last = (secs, format_utc(secs));
        }
        last.1.clone()
    })
}
/// Formats Unix seconds as an ISO 8601 UTC timestamp.
///
/// ```
/// assert_eq!(ncps::logging::format_utc(0), "1970-01-01T00:00:00Z");
/// assert_eq!(ncps::logging::format_utc(1_795_000_000), "2026-11-18T11:06:40Z");
/// ```
pub fn format_utc(secs: u64) -> String {
    let (year, month, day) = crate::tz::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::ceiling;
    use log::Level;

    #[test]
    fn the_postgresql_driver_logs_only_warnings_and_the_http_stack_up_to_info() {
        for t in ["tokio_postgres::prepare", "tokio_postgres::query", "postgres", "postgres_protocol::x", "tokio_rustls"] {
            assert_eq!(ceiling(t), Level::Warn, "{t}");
        }
        for t in ["ureq::unversioned::transport", "ureq_proto::client", "rustls::client::hs"] {
            assert_eq!(ceiling(t), Level::Info, "{t}");
        }
        for t in ["ncps::index::postgres", "ncps::serve", "ncps"] {
            assert_eq!(ceiling(t), Level::Trace, "our own lines are not capped: {t}");
        }
    }
}
