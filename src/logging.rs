//! Log lines on stderr: `2026-11-25T12:00:00Z INFO message`, one per event.
//!
//! Timestamps are UTC and computed here, because the logger's own timestamp feature would pull
//! in a date library for one line of formatting. Under systemd the journal adds its own.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn init(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level)
        // The HTTP client and TLS stack are chatty at debug; their news is in our own lines.
        .filter_module("ureq", level.min(log::LevelFilter::Info))
        .filter_module("ureq_proto", level.min(log::LevelFilter::Info))
        .filter_module("rustls", level.min(log::LevelFilter::Info))
        .format(|buf, record| {
            writeln!(buf, "{} {:<5} {}", utc_now(), record.level(), record.args())
        });
    // try_init: a second call (tests) keeps the first logger instead of panicking.
    let _ = builder.try_init();
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_utc(secs)
}

/// Formats Unix seconds as an ISO 8601 UTC timestamp.
///
/// ```
/// assert_eq!(ncps::logging::format_utc(0), "1970-01-01T00:00:00Z");
/// assert_eq!(ncps::logging::format_utc(1_795_000_000), "2026-11-18T11:06:40Z");
/// ```
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant's algorithm), valid for every date after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
