//! Upstream health, and what a miss answers when upstreams fail.
//!
//! Two decisions, both pure and unit-tested here:
//! - [`UpstreamHealth`]: the state machine of one upstream. Requests report success or
//!   failure; [`FAILURES_TO_MARK_DOWN`] failures in a row (refused, timed out, 5xx) mark it
//!   down for a back-off of [`BACKOFF_MIN`], doubling on each failed retry up to
//!   [`BACKOFF_MAX`]. While down it is skipped at once, so a miss answers in microseconds
//!   instead of after a connect timeout per request; a background probe of `/nix-cache-info`
//!   (one thread per upstream, [`Cache::run_prober`]) brings it back as soon as it answers.
//! - [`verdict`]: what a miss answers, from what each upstream said. `404` only when every
//!   upstream said "not here" (or answered something ncps refuses to vouch for); when any of
//!   them could not answer, the truth is "unknown", which is a `502` (`504` when each failure
//!   was a timeout). The difference matters to clients: Nix remembers a 404 as "absent" for
//!   `narinfo-cache-negative-ttl` (an hour by default) and skips the cache for that path
//!   meanwhile; a 5xx is remembered nowhere, so the path is substituted as soon as the
//!   upstream is back.
//!
//! Why these numbers: one refused connection or one 5xx blip should not take an upstream out
//! (three in a row is an outage far more often than not); 2 s is shorter than the retries Nix
//! makes of a 5xx (0.25 s doubling, five attempts), so an upstream back within a client's
//! retries is used by them; a minute bounds how late a recovery is noticed.

use super::{lock, Cache};
use crate::metrics::Metrics;
use crate::upstream::UpstreamError;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Failures in a row that mark an upstream down.
pub const FAILURES_TO_MARK_DOWN: u32 = 3;
/// The first back-off; each failed probe doubles it.
pub const BACKOFF_MIN: Duration = Duration::from_secs(2);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The health of one upstream. All times come from the caller, so every transition can be
/// tested without waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHealth {
    consecutive_failures: u32,
    /// `Some` while marked down: when the next probe is due.
    down_until: Option<Instant>,
    /// The back-off last used; zero once a request succeeded. Kept when a probe brings the
    /// upstream back, so one that answers probes but fails requests backs off further each
    /// time instead of flapping every 2 s.
    backoff: Duration,
    /// Whether the last failure was a timeout (what a skipped request reports).
    last_timed_out: bool,
}

/// What a report changed, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Marked down; the first probe is due after this long.
    MarkedDown(Duration),
    /// A probe failed; the next one is due after this long.
    StillDown(Duration),
    /// Up again (a probe or a request succeeded).
    BackUp,
}

impl Default for UpstreamHealth {
    fn default() -> Self {
        UpstreamHealth { consecutive_failures: 0, down_until: None, backoff: Duration::ZERO, last_timed_out: false }
    }
}

impl UpstreamHealth {
    pub fn is_down(&self) -> bool {
        self.down_until.is_some()
    }

    /// Whether requests go past this upstream without asking it.
    pub fn skip(&self) -> bool {
        self.is_down()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn last_timed_out(&self) -> bool {
        self.last_timed_out
    }

    /// When the next probe is due (`None` while up: no probes then).
    pub fn next_probe(&self) -> Option<Instant> {
        self.down_until
    }

    pub fn probe_due(&self, now: Instant) -> bool {
        self.down_until.is_some_and(|t| now >= t)
    }

    fn next_backoff(&self) -> Duration {
        if self.backoff.is_zero() {
            BACKOFF_MIN
        } else {
            (self.backoff * 2).min(BACKOFF_MAX)
        }
    }

    /// A request to the upstream succeeded (it answered, a clean "not here" included).
    pub fn succeeded(&mut self) -> Change {
        let was_down = self.is_down();
        *self = UpstreamHealth::default();
        if was_down {
            Change::BackUp
        } else {
            Change::None
        }
    }

    /// A request to the upstream failed: unreachable, timed out, or a 5xx.
    pub fn failed(&mut self, timed_out: bool, now: Instant) -> Change {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_timed_out = timed_out;
        // Requests that were already under way when it was marked down change nothing more.
        if self.is_down() || self.consecutive_failures < FAILURES_TO_MARK_DOWN {
            return Change::None;
        }
        self.backoff = self.next_backoff();
        self.down_until = Some(now + self.backoff);
        Change::MarkedDown(self.backoff)
    }

    /// A probe of a down upstream answered (`ok`) or not.
    pub fn probed(&mut self, ok: bool, timed_out: bool, now: Instant) -> Change {
        if !self.is_down() {
            return Change::None;
        }
        if ok {
            self.consecutive_failures = 0;
            self.down_until = None;
            return Change::BackUp;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_timed_out = timed_out;
        self.backoff = self.next_backoff();
        self.down_until = Some(now + self.backoff);
        Change::StillDown(self.backoff)
    }
}

/// What one upstream said to one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// 404, 403 or 410: it does not have it.
    Absent,
    /// It answered, and ncps refused the answer (a bad signature, a length other than the
    /// narinfo's, a body too large): it does not vouch for the path.
    Refused,
    /// No clean answer: unreachable, a timeout, a 5xx, or another unexpected status.
    Failed { timed_out: bool },
    /// Not asked: marked down (and whether its last failure was a timeout).
    Skipped { timed_out: bool },
}

/// What a miss answers when no upstream delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every upstream said it has no such thing (or refused to vouch for it): `404`.
    Absent,
    /// Some upstream could not answer: `502`, or `504` when every failure was a timeout.
    Unavailable { status: u16 },
}

impl Verdict {
    /// Whether "absent" may be remembered (only a clean "not here" from every upstream: a
    /// refused answer may be fixed upstream a moment later, an outage may end).
    pub fn may_remember(attempts: &[Attempt]) -> bool {
        attempts.iter().all(|a| *a == Attempt::Absent)
    }
}

/// The answer to a miss no upstream delivered, from what each upstream said.
pub fn verdict(attempts: &[Attempt]) -> Verdict {
    let mut failures = 0;
    let mut timeouts = 0;
    for a in attempts {
        match a {
            Attempt::Absent | Attempt::Refused => {}
            Attempt::Failed { timed_out } | Attempt::Skipped { timed_out } => {
                failures += 1;
                timeouts += usize::from(*timed_out);
            }
        }
    }
    match failures {
        0 => Verdict::Absent,
        n if n == timeouts => Verdict::Unavailable { status: 504 },
        _ => Verdict::Unavailable { status: 502 },
    }
}

/// What each upstream said to one lookup, gathered as they are asked.
#[derive(Default)]
pub(super) struct Tally {
    attempts: Vec<Attempt>,
    notes: Vec<String>,
}

/// A miss no upstream delivered: the answer, whether "absent" may be remembered, and why
/// (what each upstream said, for the body of a 5xx and the log).
#[derive(Debug, Clone)]
pub(super) struct Missed {
    pub verdict: Verdict,
    pub remember: bool,
    pub reason: Arc<str>,
}

impl Tally {
    pub(super) fn add(&mut self, upstream: &str, attempt: Attempt, why: impl std::fmt::Display) {
        self.attempts.push(attempt);
        self.notes.push(format!("{upstream}: {why}"));
    }

    pub(super) fn missed(self) -> Missed {
        let verdict = verdict(&self.attempts);
        let reason = match verdict {
            Verdict::Absent if self.notes.is_empty() => "no upstream is configured".to_string(),
            Verdict::Absent => format!("no upstream has it ({})", self.notes.join("; ")),
            Verdict::Unavailable { .. } => format!("no upstream could answer ({})", self.notes.join("; ")),
        };
        Missed { verdict, remember: Verdict::may_remember(&self.attempts), reason: Arc::from(reason) }
    }

    /// A lookup given up because every client left: nothing is remembered, and the answer
    /// (which nobody reads) is a 503.
    pub(super) fn missed_for_nobody(self) -> Missed {
        Missed {
            verdict: Verdict::Unavailable { status: 503 },
            remember: false,
            reason: Arc::from("every client left; lookup stopped"),
        }
    }
}

impl Missed {
    pub(super) fn answer(&self) -> super::Answer {
        match self.verdict {
            Verdict::Absent => super::Answer::NotFound,
            Verdict::Unavailable { status } => super::Answer::Unavailable { status, reason: self.reason.to_string() },
        }
    }
}

/// Every configured upstream's health, shared by requests and probers.
pub(super) struct Board {
    states: Mutex<Vec<UpstreamHealth>>,
    /// Wakes the probers when an upstream is marked down.
    changed: Condvar,
    /// How each upstream is named in the log and in answers (no credentials).
    shown: Vec<String>,
    metrics: Arc<Metrics>,
}

impl Board {
    pub(super) fn new(urls: &[String], metrics: Arc<Metrics>) -> Board {
        Board {
            states: Mutex::new(vec![UpstreamHealth::default(); urls.len()]),
            changed: Condvar::new(),
            shown: urls.iter().map(|u| crate::url::without_secrets(u)).collect(),
            metrics,
        }
    }

    pub(super) fn shown(&self, i: usize) -> &str {
        self.shown.get(i).map_or("?", String::as_str)
    }

    /// `Some(the attempt to report)` when upstream `i` is marked down and must not be asked.
    pub(super) fn skip(&self, i: usize) -> Option<Attempt> {
        let states = lock(&self.states);
        let s = states.get(i)?;
        s.skip().then(|| Attempt::Skipped { timed_out: s.last_timed_out() })
    }

    /// Why upstream `i` was skipped, for the answer and the log.
    pub(super) fn why_skipped(&self, i: usize) -> String {
        let states = lock(&self.states);
        let Some(s) = states.get(i) else { return String::new() };
        let retry = s.next_probe().map_or(0.0, |t| t.saturating_duration_since(Instant::now()).as_secs_f64());
        format!(
            "marked down after {} failures in a row; next try in {retry:.0}s",
            s.consecutive_failures()
        )
    }

    pub(super) fn succeeded(&self, i: usize) {
        self.report(i, |s| s.succeeded());
    }

    pub(super) fn failed(&self, i: usize, timed_out: bool) {
        self.report(i, |s| s.failed(timed_out, Instant::now()));
    }

    fn probed(&self, i: usize, ok: bool, timed_out: bool) {
        self.report(i, |s| s.probed(ok, timed_out, Instant::now()));
    }

    fn report(&self, i: usize, f: impl FnOnce(&mut UpstreamHealth) -> Change) {
        let mut states = lock(&self.states);
        let Some(s) = states.get_mut(i) else { return };
        let before = s.consecutive_failures();
        let change = f(s);
        let failures = s.consecutive_failures();
        if failures != before || change != Change::None {
            // Under the lock, so that two reports cannot reach the metrics in the wrong order.
            let retry_in = s.next_probe().map(|t| t.saturating_duration_since(Instant::now()));
            self.metrics.upstream_health(i, s.is_down(), failures, retry_in);
        }
        drop(states);
        let shown = self.shown(i);
        match change {
            Change::None => {}
            Change::MarkedDown(d) => {
                log::warn!(
                    "upstream {shown}: marked down after {failures} failures in a row; skipped for {}s, then probed",
                    d.as_secs()
                );
                self.changed.notify_all();
            }
            Change::StillDown(d) => {
                log::info!("upstream {shown}: still down ({failures} failures in a row); next probe in {}s", d.as_secs())
            }
            Change::BackUp => log::warn!("upstream {shown}: up again"),
        }
    }
}

impl Cache {
    /// Counts a failed request to upstream `i` towards its health (only an outage does) and
    /// says what it means for the lookup.
    pub(super) fn upstream_failed(&self, i: usize, e: &UpstreamError) -> Attempt {
        if e.is_outage() {
            self.health.failed(i, e.is_timeout());
            Attempt::Failed { timed_out: e.is_timeout() }
        } else {
            // It answered: it is up, but what it said is of no use.
            self.health.succeeded(i);
            match e {
                UpstreamError::Status(_) => Attempt::Failed { timed_out: false },
                _ => Attempt::Refused,
            }
        }
    }

    /// Upstream `i`'s prober: sleeps while the upstream is up; while it is down, asks for
    /// `/nix-cache-info` whenever a probe is due, until it answers.
    pub(super) fn run_prober(&self, i: usize) {
        let Some(upstream) = self.upstreams.list().get(i).cloned() else { return };
        loop {
            {
                let mut states = lock(&self.health.states);
                loop {
                    let now = Instant::now();
                    let wait = match states.get(i).and_then(UpstreamHealth::next_probe) {
                        Some(t) if now >= t => break,
                        Some(t) => t - now,
                        None => Duration::from_secs(3600),
                    };
                    states = self.health.changed.wait_timeout(states, wait).unwrap_or_else(|p| p.into_inner()).0;
                }
            }
            let started = Instant::now();
            let result = self.upstreams.cache_info(&upstream);
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            match result {
                Ok(()) => {
                    log::info!("upstream {}: probe answered in {ms:.1}ms", self.health.shown(i));
                    self.health.probed(i, true, false);
                }
                Err(e) => {
                    log::debug!("upstream {}: probe failed after {ms:.1}ms: {e}", self.health.shown(i));
                    self.metrics.upstream_error_detail(i, &format!("probe: {e}"));
                    self.health.probed(i, false, e.is_timeout());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(h: &mut UpstreamHealth, n: u32, now: Instant) -> Change {
        let mut last = Change::None;
        for _ in 0..n {
            last = h.failed(false, now);
        }
        last
    }

    #[test]
    fn an_upstream_is_marked_down_after_three_failures_in_a_row_and_skipped_until_a_probe_answers() {
        let t0 = Instant::now();
        let mut h = UpstreamHealth::default();
        assert_eq!(fail(&mut h, 2, t0), Change::None);
        assert!(!h.skip(), "two failures are a blip");
        assert_eq!(h.failed(false, t0), Change::MarkedDown(BACKOFF_MIN));
        assert!(h.skip());
        assert!(!h.probe_due(t0 + BACKOFF_MIN - Duration::from_millis(1)));
        assert!(h.probe_due(t0 + BACKOFF_MIN));
        assert_eq!(h.probed(true, false, t0 + BACKOFF_MIN), Change::BackUp);
        assert!(!h.skip());
        assert_eq!(h.consecutive_failures(), 0);
        assert_eq!(h.next_probe(), None, "no probes while up");
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let t0 = Instant::now();
        let mut h = UpstreamHealth::default();
        fail(&mut h, 2, t0);
        assert_eq!(h.succeeded(), Change::None);
        fail(&mut h, 2, t0);
        assert!(!h.skip());
        assert_eq!(h.consecutive_failures(), 2);
    }

    #[test]
    fn failed_probes_double_the_back_off_up_to_a_minute() {
        let mut now = Instant::now();
        let mut h = UpstreamHealth::default();
        assert_eq!(fail(&mut h, 3, now), Change::MarkedDown(Duration::from_secs(2)));
        let mut seen = Vec::new();
        for _ in 0..7 {
            now = h.next_probe().unwrap();
            match h.probed(false, false, now) {
                Change::StillDown(d) => seen.push(d.as_secs()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, [4, 8, 16, 32, 60, 60, 60]);
        assert!(h.skip());
    }

    #[test]
    fn an_upstream_that_answers_probes_but_fails_requests_backs_off_further_each_time() {
        let now = Instant::now();
        let mut h = UpstreamHealth::default();
        assert_eq!(fail(&mut h, 3, now), Change::MarkedDown(Duration::from_secs(2)));
        h.probed(true, false, now);
        assert_eq!(fail(&mut h, 3, now), Change::MarkedDown(Duration::from_secs(4)));
        // A request that succeeds is the real recovery: the next outage starts at 2 s again.
        h.probed(true, false, now);
        h.succeeded();
        assert_eq!(fail(&mut h, 3, now), Change::MarkedDown(Duration::from_secs(2)));
    }

    #[test]
    fn requests_already_under_way_when_marked_down_do_not_extend_the_back_off() {
        let now = Instant::now();
        let mut h = UpstreamHealth::default();
        fail(&mut h, 3, now);
        let due = h.next_probe();
        assert_eq!(fail(&mut h, 5, now + Duration::from_secs(1)), Change::None);
        assert_eq!(h.next_probe(), due);
        assert_eq!(h.consecutive_failures(), 8, "still counted, for the status page");
        // And one that succeeds brings it back at once.
        assert_eq!(h.succeeded(), Change::BackUp);
        assert!(!h.skip());
    }

    #[test]
    fn a_probe_of_an_upstream_that_is_up_changes_nothing() {
        let mut h = UpstreamHealth::default();
        assert_eq!(h.probed(false, false, Instant::now()), Change::None);
        assert_eq!(h, UpstreamHealth::default());
    }

    #[test]
    fn a_skipped_upstream_reports_whether_its_last_failure_was_a_timeout() {
        let now = Instant::now();
        let mut h = UpstreamHealth::default();
        for _ in 0..3 {
            h.failed(true, now);
        }
        assert!(h.skip() && h.last_timed_out());
    }

    #[test]
    fn a_miss_is_404_only_when_every_upstream_said_absent_or_refused_to_vouch() {
        use Attempt::*;
        assert_eq!(verdict(&[]), Verdict::Absent, "no upstream configured: nobody has it");
        assert_eq!(verdict(&[Absent, Absent]), Verdict::Absent);
        assert_eq!(verdict(&[Absent, Refused]), Verdict::Absent);
        assert_eq!(verdict(&[Absent, Failed { timed_out: false }]), Verdict::Unavailable { status: 502 });
        assert_eq!(verdict(&[Skipped { timed_out: false }]), Verdict::Unavailable { status: 502 });
    }

    #[test]
    fn a_miss_is_504_when_every_upstream_that_failed_timed_out() {
        use Attempt::*;
        assert_eq!(verdict(&[Failed { timed_out: true }, Absent]), Verdict::Unavailable { status: 504 });
        assert_eq!(verdict(&[Failed { timed_out: true }, Skipped { timed_out: true }]), Verdict::Unavailable { status: 504 });
        assert_eq!(
            verdict(&[Failed { timed_out: true }, Failed { timed_out: false }]),
            Verdict::Unavailable { status: 502 },
            "one refused connection among timeouts is not a timeout"
        );
    }

    #[test]
    fn only_a_clean_absent_from_every_upstream_is_remembered() {
        use Attempt::*;
        assert!(Verdict::may_remember(&[Absent, Absent]));
        assert!(!Verdict::may_remember(&[Absent, Refused]));
        assert!(!Verdict::may_remember(&[Absent, Failed { timed_out: false }]));
        assert!(!Verdict::may_remember(&[Skipped { timed_out: false }]));
    }
}
