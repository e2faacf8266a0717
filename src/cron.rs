//! Cron schedules for the LRU pass, as ncps takes them: five fields (`minute hour day-of-month
//! month day-of-week`) or a descriptor (`@daily`, `@hourly`, `@every 1h`, ...).
//!
//! Times are matched in the process's local time zone, which `--cache-lru-schedule-timezone`
//! sets through `TZ` at start-up; the C library then does the zone rules, so ncps carries no
//! time zone database of its own.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Every(Duration),
    Fields(Fields),
}

/// A bit set per field: bit `n` set means value `n` matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Cron's rule: when both day fields are restricted, a day matches if either does.
    days_restricted: bool,
    weekdays_restricted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronError(String);

impl fmt::Display for CronError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CronError {}

fn field(text: &str, min: u32, max: u32, what: &str) -> Result<(u64, bool), CronError> {
    let bad = || CronError(format!("bad {what} field {text:?} (allowed {min}-{max})"));
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().ok().filter(|&s| s > 0).ok_or_else(bad)?),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)
        } else {
            let v: u32 = range.parse().map_err(|_| bad())?;
            (v, if part.contains('/') { max } else { v })
        };
        // Day of week 7 is Sunday too.
        let (lo, hi) = if what == "day-of-week" && hi == 7 && lo <= 7 { (lo.min(6), 6) } else { (lo, hi) };
        if lo < min || hi > max || lo > hi {
            return Err(bad());
        }
        if what == "day-of-week" && range.ends_with('7') && !range.contains('-') {
            bits |= 1;
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, text != "*"))
}

impl Schedule {
    /// ```
    /// use ncps::cron::Schedule;
    /// assert!(Schedule::parse("0 2 * * *").is_ok());
    /// assert!(Schedule::parse("@every 90m").is_ok());
    /// assert!(Schedule::parse("61 * * * *").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Schedule, CronError> {
        let text = text.trim();
        let spec = match text {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => text,
        };
        if let Some(d) = spec.strip_prefix("@every ") {
            let d = crate::duration::parse_duration(d.trim())
                .filter(|d| *d >= Duration::from_secs(1))
                .ok_or_else(|| CronError(format!("bad duration in {text:?}")))?;
            return Ok(Schedule::Every(d));
        }
        let parts: Vec<&str> = spec.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError("expected 5 fields: minute hour day-of-month month day-of-week".into()));
        }
        let (minutes, _) = field(parts[0], 0, 59, "minute")?;
        let (hours, _) = field(parts[1], 0, 23, "hour")?;
        let (days, days_restricted) = field(parts[2], 1, 31, "day-of-month")?;
        let (months, _) = field(parts[3], 1, 12, "month")?;
        let (weekdays, weekdays_restricted) = field(parts[4], 0, 7, "day-of-week")?;
        Ok(Schedule::Fields(Fields { minutes, hours, days, months, weekdays, days_restricted, weekdays_restricted }))
    }

    /// The first time strictly after `now` (Unix seconds) at which the schedule fires, in the
    /// process's local time zone. `None` if nothing matches within a year and a day (say, the
    /// 31st of February).
    pub fn next_after(&self, now: i64) -> Option<i64> {
        let f = match self {
            Schedule::Every(d) => return Some(now + d.as_secs() as i64),
            Schedule::Fields(f) => f,
        };
        let mut t = (now.div_euclid(60) + 1) * 60;
        for _ in 0..(367 * 24 * 60) {
            let tm = local(t)?;
            let day_ok = match (f.days_restricted, f.weekdays_restricted) {
                (true, true) => bit(f.days, tm.tm_mday) || bit(f.weekdays, tm.tm_wday),
                _ => bit(f.days, tm.tm_mday) && bit(f.weekdays, tm.tm_wday),
            };
            if bit(f.months, tm.tm_mon + 1) && day_ok && bit(f.hours, tm.tm_hour) && bit(f.minutes, tm.tm_min) {
                return Some(t);
            }
            t += 60;
        }
        None
    }
}

fn bit(set: u64, v: libc::c_int) -> bool {
    (0..64).contains(&v) && set & (1 << v) != 0
}

// libc marks time_t deprecated on musl (its width changed across musl versions); the call
// below is the portable way to use it.
#[allow(deprecated)]
fn local(t: i64) -> Option<libc::tm> {
    // SAFETY: localtime_r writes only into the tm we pass; all-zero is a valid tm.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let tt = t as libc::time_t;
        if libc::localtime_r(&tt, &mut tm).is_null() {
            return None;
        }
        Some(tm)
    }
}

/// Whether a `--cache-lru-schedule-timezone` value names a zone this machine knows.
pub fn timezone_exists(name: &str) -> bool {
    match name {
        "Local" | "UTC" => true,
        _ if name.contains("..") || name.starts_with('/') => false,
        _ => std::path::Path::new("/usr/share/zoneinfo").join(name).is_file(),
    }
}

/// Makes `name` the process's local time zone. Call before any thread starts: `TZ` is read
/// by the C library, and changing the environment is not thread-safe.
pub fn set_timezone(name: &str) {
    if name == "Local" {
        return;
    }
    std::env::set_var("TZ", name);
    extern "C" {
        fn tzset();
    }
    // SAFETY: tzset has no arguments and only reads TZ; no other thread runs yet.
    unsafe { tzset() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily_at_two_fires_at_the_next_two_oclock() {
        set_timezone("UTC");
        let s = Schedule::parse("0 2 * * *").unwrap();
        // 2026-11-25T12:00:00Z -> 2026-11-26T02:00:00Z
        assert_eq!(s.next_after(1_795_608_000), Some(1_795_608_000 + 14 * 3600));
        let hourly = Schedule::parse("@hourly").unwrap();
        assert_eq!(hourly.next_after(1_795_608_000), Some(1_795_608_000 + 3600));
        let every = Schedule::parse("*/15 * * * *").unwrap();
        assert_eq!(every.next_after(1_795_608_000), Some(1_795_608_000 + 900));
    }

    #[test]
    fn impossible_and_malformed_specs() {
        assert_eq!(Schedule::parse("0 0 31 2 *").unwrap().next_after(0), None);
        for bad in ["* * * *", "a * * * *", "0 24 * * *", "0 0 0 * *", "*/0 * * * *", "@every x"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
        assert!(timezone_exists("UTC"));
        assert!(!timezone_exists("../etc/passwd"));
    }
}
