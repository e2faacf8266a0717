//! Cron schedules for the LRU pass, as ncps takes them: five fields (`minute hour day-of-month
//! month day-of-week`) or a descriptor (`@daily`, `@hourly`, `@every 1h`, ...).
//!
//! Times are matched on the wall clock of a [`Zone`] (`--cache-lru-schedule-timezone`), read
//! from the system's zone files; the process's own time zone is not touched. Across a change
//! of the clock the schedule does what robfig/cron v3 (Go ncps's) does: a time the clock skips
//! does not fire that day, and a time it shows twice fires twice (DESIGN.md, "Schedules and
//! time zones").

use crate::tz::Zone;
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

    /// The first time strictly after `now` (Unix seconds) at which the schedule fires, on the
    /// wall clock of `zone` (`@every` ignores the zone). `None` if nothing matches within a year
    /// and a day (say, the 31st of February).
    pub fn next_after(&self, now: i64, zone: &Zone) -> Option<i64> {
        let f = match self {
            Schedule::Every(d) => return Some(now + d.as_secs() as i64),
            Schedule::Fields(f) => f,
        };
        // Every minute in turn, so a skipped wall-clock time is never matched and a repeated
        // one is matched each time it is shown.
        let mut t = (now.div_euclid(60) + 1) * 60;
        for _ in 0..(367 * 24 * 60) {
            let c = zone.civil(t);
            let day_ok = match (f.days_restricted, f.weekdays_restricted) {
                (true, true) => bit(f.days, c.day) || bit(f.weekdays, c.weekday),
                _ => bit(f.days, c.day) && bit(f.weekdays, c.weekday),
            };
            if bit(f.months, c.month) && day_ok && bit(f.hours, c.hour) && bit(f.minutes, c.minute) {
                return Some(t);
            }
            t += 60;
        }
        None
    }
}

fn bit(set: u64, v: u32) -> bool {
    v < 64 && set & (1 << v) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-25T12:00:00Z
    const NOV_25: i64 = 1_795_608_000;
    /// 2026-01-15T00:00:00Z and 2026-07-15T00:00:00Z
    const JAN_15: i64 = 1_768_435_200;
    const JUL_15: i64 = 1_784_073_600;

    fn zone(name: &str) -> Zone {
        Zone::load(name).unwrap_or_else(|e| panic!("{e} (is tzdata installed? `make deps`)"))
    }

    /// Every time the schedule fires in [from, to).
    fn fires(spec: &str, zone: &Zone, from: i64, to: i64) -> Vec<i64> {
        let s = Schedule::parse(spec).unwrap();
        let mut out = Vec::new();
        let mut t = from - 1;
        while let Some(next) = s.next_after(t, zone).filter(|&n| n < to) {
            out.push(next);
            t = next;
        }
        out
    }

    #[test]
    fn daily_at_two_in_utc_fires_at_the_next_two_oclock_utc() {
        let utc = Zone::utc();
        let s = Schedule::parse("0 2 * * *").unwrap();
        // 2026-11-25T12:00:00Z -> 2026-11-26T02:00:00Z
        assert_eq!(s.next_after(NOV_25, &utc), Some(NOV_25 + 14 * 3600));
        let hourly = Schedule::parse("@hourly").unwrap();
        assert_eq!(hourly.next_after(NOV_25, &utc), Some(NOV_25 + 3600));
        let every = Schedule::parse("*/15 * * * *").unwrap();
        assert_eq!(every.next_after(NOV_25, &utc), Some(NOV_25 + 900));
        assert_eq!(s.next_after(NOV_25, &zone("UTC")), s.next_after(NOV_25, &zone("Etc/UTC")));
    }

    #[test]
    fn daily_at_two_in_berlin_fires_at_one_utc_in_winter_and_midnight_utc_in_summer() {
        let berlin = zone("Europe/Berlin");
        let s = Schedule::parse("0 2 * * *").unwrap();
        assert_eq!(s.next_after(JAN_15, &berlin), Some(JAN_15 + 3600));
        assert_eq!(s.next_after(JUL_15, &berlin), Some(JUL_15 + 86_400));
        assert_eq!(s.next_after(JUL_15 - 1, &berlin), Some(JUL_15));
    }

    #[test]
    fn a_wall_clock_time_skipped_by_spring_forward_does_not_fire_that_day() {
        // Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST (at 01:00Z).
        let berlin = zone("Europe/Berlin");
        let mar_28 = 1_774_656_000; // 2026-03-28T00:00:00Z
        let days = |n: i64| mar_28 + n * 86_400;
        assert_eq!(
            fires("30 2 * * *", &berlin, days(0), days(3)),
            vec![days(0) + 3600 + 1800, days(2) + 1800],
            "02:30 on the 28th (01:30Z) and the 30th (00:30Z), none on the 29th"
        );
        // The hours around it fire once each; hour 2 is missing.
        let hourly = fires("0 * * * *", &berlin, days(1), days(1) + 4 * 3600);
        assert_eq!(hourly.iter().map(|&t| berlin.civil(t).hour).collect::<Vec<_>>(), [1, 3, 4, 5]);
        // New York, 2012-03-11, as robfig/cron's tests: the 2 am job is skipped, 1 am runs.
        let ny = zone("America/New_York");
        let mar_11_2012_est = 1_331_442_000; // 2012-03-11T00:00:00-05:00
        let s = Schedule::parse("0 2 * * *").unwrap();
        assert_eq!(s.next_after(mar_11_2012_est, &ny), Some(mar_11_2012_est + 86_400 + 3600));
        let s = Schedule::parse("0 1 * * *").unwrap();
        assert_eq!(s.next_after(mar_11_2012_est, &ny), Some(mar_11_2012_est + 3600));
    }

    #[test]
    fn a_wall_clock_time_repeated_by_fall_back_fires_at_both_of_its_instants() {
        // Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET (at 01:00Z), so 02:30 is shown twice.
        let berlin = zone("Europe/Berlin");
        let oct_25 = 1_792_886_400; // 2026-10-25T00:00:00Z
        assert_eq!(
            fires("30 2 * * *", &berlin, oct_25 - 86_400, oct_25 + 86_400),
            vec![oct_25 - 86_400 + 1800, oct_25 + 1800, oct_25 + 3600 + 1800],
            "02:30 CEST on the 24th, then 02:30 CEST and 02:30 CET on the 25th"
        );
        // Times outside the repeated hour fire once.
        assert_eq!(fires("30 3 * * *", &berlin, oct_25, oct_25 + 86_400), vec![oct_25 + 2 * 3600 + 1800]);
        // New York, 2012-11-04, as robfig/cron's tests: the 1 am job runs twice.
        let ny = zone("America/New_York");
        let nov_4_2012_edt = 1_352_001_600; // 2012-11-04T00:00:00-04:00
        assert_eq!(
            fires("0 1 * * *", &ny, nov_4_2012_edt, nov_4_2012_edt + 86_400),
            vec![nov_4_2012_edt + 3600, nov_4_2012_edt + 2 * 3600]
        );
    }

    #[test]
    fn every_is_the_same_in_every_zone() {
        let s = Schedule::parse("@every 90m").unwrap();
        for z in ["UTC", "Europe/Berlin", "Asia/Kathmandu", "America/New_York"] {
            assert_eq!(s.next_after(NOV_25, &zone(z)), Some(NOV_25 + 5400), "{z}");
        }
    }

    #[test]
    fn impossible_and_malformed_specs() {
        assert_eq!(Schedule::parse("0 0 31 2 *").unwrap().next_after(0, &Zone::utc()), None);
        for bad in ["* * * *", "a * * * *", "0 24 * * *", "0 0 0 * *", "*/0 * * * *", "@every x"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
