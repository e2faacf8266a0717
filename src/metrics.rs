//! What ncps counts, for `GET /metrics` (Prometheus) and the status page.
//!
//! Recording happens on every request, so it must not take a lock or allocate: every series
//! is known when ncps starts (two kinds of object, four outcomes, a fixed list of status codes,
//! the configured upstreams), so each one is an atomic in a fixed table and recording is one
//! `fetch_add`. Locks guard only what is written on the slow path (the list of recent misses
//! and an upstream's last error text). The same hooks feed the last 24 hours, minute by
//! minute, for the status page's charts ([`crate::history`], a fixed 180 KiB ring, also
//! lock-free). The text format is simple enough to write by hand,
//! which keeps a client library, its registry and its global state out of the dependency
//! budget.
//!
//! Names follow Go ncps where it has one, so existing dashboards keep working; the rest use
//! the `ncps_` prefix, and process metrics use the names every Prometheus client uses. Two
//! ncps names (`ncps_narinfo_count`, `ncps_nar_file_count`) are not used: they are gauges
//! ending in `_count`, which `promtool check metrics` rejects because that suffix belongs to
//! histograms and summaries.

use crate::history::{History, LatencyRing, Percentiles};
use std::collections::VecDeque;
use std::fmt::{Display, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `Content-Type` of [`Metrics::render_prometheus`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How many misses the status page lists.
const RECENT_MISSES: usize = 20;
/// Longest miss description kept; the rest is cut, so a client cannot make ncps keep much.
const MAX_MISS_LEN: usize = 200;
/// Longest upstream error text kept.
const MAX_ERROR_LEN: usize = 300;

/// Upper bounds (seconds) of the upstream fetch histograms: from a fast LAN mirror (a few ms)
/// to a large NAR over a slow link (a minute); longer fetches land in `+Inf`.
const BUCKETS: [f64; 13] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Status codes counted under their own label value; anything else is counted as `other`, so
/// the number of series stays fixed whatever a handler returns.
const CODES: [u16; 12] = [200, 206, 304, 400, 403, 404, 405, 416, 500, 502, 503, 504];
const N_CODES: usize = CODES.len() + 1;

/// Narinfos fetched whose NAR has not been asked for yet, remembered so that the NAR's
/// download can be listed under its store path's name: `nix copy` asks for every narinfo of
/// a closure before the first NAR, so this is more than [`RECENT_MISSES`]. At most 256 ×
/// (a store path name of at most 211 bytes + a NAR name + 40) ≈ 110 KB.
const PENDING_NARS: usize = 256;

/// Which object a request or an upstream fetch was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Narinfo,
    Nar,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Narinfo, Kind::Nar];

    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Narinfo => "narinfo",
            Kind::Nar => "nar",
        }
    }
}

/// How a request for a narinfo or a NAR was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From the local store.
    Hit,
    /// Not stored here; fetched (or being fetched) from an upstream.
    Miss,
    /// Neither here nor on any upstream.
    NotFound,
    /// ncps or every upstream failed.
    Error,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Outcome::Hit, Outcome::Miss, Outcome::NotFound, Outcome::Error];

    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::NotFound => "not_found",
            Outcome::Error => "error",
        }
    }
}

/// The store's figures at the time of a scrape; they live in the index, not here.
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    pub size_bytes: u64,
    pub nar_count: u64,
    pub narinfo_count: u64,
    /// `--cache-max-size`, if set.
    pub max_size: Option<u64>,
}

/// A fixed table of counters, one per (kind, outcome, status code).
struct Served {
    counts: Vec<AtomicU64>,
    /// Bytes announced in answers, per (kind, hit or miss).
    bytes: [[AtomicU64; 2]; 2],
}

impl Served {
    fn new() -> Served {
        Served { counts: zeros(Kind::ALL.len() * Outcome::ALL.len() * N_CODES), bytes: Default::default() }
    }

    fn slot(kind: Kind, outcome: Outcome, code: usize) -> usize {
        (kind.index() * Outcome::ALL.len() + outcome.index()) * N_CODES + code
    }

    fn get(&self, kind: Kind, outcome: Outcome, code: usize) -> u64 {
        self.counts[Self::slot(kind, outcome, code)].load(Relaxed)
    }

    fn total(&self, kind: Kind, outcome: Outcome) -> u64 {
        (0..N_CODES).map(|c| self.get(kind, outcome, c)).sum()
    }
}

fn zeros(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn code_index(status: u16) -> usize {
    CODES.iter().position(|&c| c == status).unwrap_or(CODES.len())
}

fn code_label(index: usize) -> String {
    CODES.get(index).map_or_else(|| "other".to_string(), |c| c.to_string())
}

struct Histogram {
    /// Observations per bucket, not cumulative (the last one is above every bound); summed
    /// when rendered, so recording touches one counter.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram { buckets: zeros(BUCKETS.len() + 1), sum_nanos: AtomicU64::new(0) }
    }

    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }
}

/// Last result of an upstream request, for "healthy".
const NEVER: u8 = 0;
const LAST_OK: u8 = 1;
const LAST_FAILED: u8 = 2;

struct Upstream {
    /// As configured: what [`Metrics::upstream_for_url`] matches against.
    url: String,
    /// For people: no credentials, no query.
    shown: String,
    /// The `upstream_hostname` label value, unique among upstreams.
    label: String,
    fetch: [Histogram; 2],
    errors: [AtomicU64; 2],
    bytes: AtomicU64,
    /// Milliseconds after [`Metrics::started`], plus one; 0 for never.
    last_ok_at: AtomicU64,
    last_failed_at: AtomicU64,
    last_result: AtomicU8,
    /// Narinfo lookups' time to the response head, the last hour.
    lookups: LatencyRing,
    /// Of `bytes`, those of narinfos (the rest are NARs, for the throughput).
    narinfo_bytes: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Marked down by `cache::health` (skipped until a probe answers).
    down: AtomicBool,
    consecutive_failures: AtomicU64,
    /// When the next probe is due, as a [`Metrics::now_mark`]; 0 for none.
    probe_at: AtomicU64,
}

/// Every counter ncps keeps. Shared by all workers (`Arc<Metrics>`); all methods take `&self`.
pub struct Metrics {
    started: Instant,
    /// Unix time the process started, from `/proc` when it can be read.
    start_time: f64,
    served: Served,
    upstreams: Vec<Upstream>,
    downloads_in_flight: AtomicU64,
    evicted_narinfos: AtomicU64,
    evicted_nars: AtomicU64,
    evicted_bytes: AtomicU64,
    recent_misses: Mutex<Misses>,
    /// The last 24 hours, minute by minute (a fixed 180 KiB ring).
    history: History,
    /// `--server-advertise-addr` of a replica: every series gets a `replica` label, so that
    /// the figures of replicas behind one Service stay apart.
    replica: std::sync::OnceLock<String>,
}

/// What became of a miss on the status page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissState {
    /// The narinfo came from an upstream; its NAR was not asked for (yet).
    Narinfo,
    /// The NAR was downloaded and verified.
    Fetched,
    /// The NAR download failed.
    Failed,
    /// No upstream has it.
    NotFound,
    /// No upstream answered cleanly.
    Unavailable,
}

impl MissState {
    pub fn label(self) -> &'static str {
        match self {
            MissState::Narinfo => "narinfo",
            MissState::Fetched => "fetched",
            MissState::Failed => "failed",
            MissState::NotFound => "not found",
            MissState::Unavailable => "unavailable",
        }
    }
}

/// A miss as the status page lists it.
#[derive(Clone, Debug)]
pub struct RecentMiss {
    /// The store path's base name (`<hash>-<name>`) when a narinfo said it, else the request path.
    pub what: String,
    /// Bytes of the NAR (as downloaded, or as its narinfo announces).
    pub size: Option<u64>,
    /// Upstream time: the narinfo lookup plus the NAR download.
    pub took_ms: Option<f64>,
    /// The upstream that served it (without credentials).
    pub upstream: Option<String>,
    pub state: MissState,
    pub secs_ago: u64,
}

struct MissEntry {
    at: Instant,
    what: String,
    /// The NAR's name, to find the entry again when its download ends.
    nar: Option<String>,
    size: Option<u64>,
    took: Option<Duration>,
    upstream: Option<usize>,
    state: MissState,
}

struct Pending {
    nar: String,
    store_path: String,
    took: Duration,
}

#[derive(Default)]
struct Misses {
    shown: VecDeque<MissEntry>,
    pending: VecDeque<Pending>,
}

impl Misses {
    fn push(&mut self, entry: MissEntry) {
        if self.shown.len() >= RECENT_MISSES {
            self.shown.pop_front();
        }
        self.shown.push_back(entry);
    }
}

/// The base name of a store path (`/nix/store/<hash>-<name>` → `<hash>-<name>`).
fn base_name(store_path: &str) -> &str {
    store_path.rsplit('/').next().unwrap_or(store_path)
}

/// Requests for one kind of object.
#[derive(Clone, Debug, Default)]
pub struct KindStats {
    pub hits: u64,
    pub misses: u64,
    pub not_found: u64,
    pub errors: u64,
    /// Bytes answered from the local store.
    pub bytes_hit: u64,
    /// Bytes answered from an upstream (while or after fetching).
    pub bytes_miss: u64,
}

impl KindStats {
    /// Hits among the requests ncps could have answered from its store: a path that exists
    /// nowhere, or a failure, says nothing about how well the cache works.
    pub fn hit_ratio(&self) -> Option<f64> {
        ratio(self.hits, self.hits + self.misses)
    }
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// One upstream as the status page shows it.
#[derive(Clone, Debug)]
pub struct UpstreamStats {
    /// The configured URL without credentials or query.
    pub url: String,
    /// The `upstream_hostname` label used in `/metrics`.
    pub label: String,
    pub requests: u64,
    pub errors: u64,
    pub bytes_fetched: u64,
    pub last_ok_secs_ago: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_secs_ago: Option<u64>,
    /// Median time to the response head of narinfo lookups, the last hour.
    pub latency_ms: Option<f64>,
    /// 95th percentile of the same.
    pub latency_p95_ms: Option<f64>,
    /// Narinfo lookups answered in the last hour (the count behind the percentiles).
    pub lookups_last_hour: u64,
    /// NAR bytes received per second of NAR download, since start.
    pub throughput: Option<f64>,
    /// The last request succeeded (or there was none yet), and it is not marked down.
    pub healthy: bool,
    /// Marked down: skipped until a probe of `/nix-cache-info` answers.
    pub down: bool,
    pub consecutive_failures: u64,
    /// While down: seconds until the next probe.
    pub next_probe_secs: Option<u64>,
}

/// The counters at one moment, as plain data.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub narinfo: KindStats,
    pub nar: KindStats,
    pub upstreams: Vec<UpstreamStats>,
    pub downloads_in_flight: u64,
    pub evicted_narinfos: u64,
    pub evicted_nars: u64,
    pub evicted_bytes: u64,
    /// Newest first.
    pub recent_misses: Vec<RecentMiss>,
    pub uptime_secs: u64,
    /// The last 24 hours in [`HISTORY_COLUMNS`] columns, oldest first; empty in a
    /// `Snapshot::default()`.
    pub history: Vec<crate::history::Totals>,
    /// Minutes per history column.
    pub minutes_per_column: u64,
}

/// Columns of the charts: 5 minutes each.
pub const HISTORY_COLUMNS: usize = 288;

impl Snapshot {
    /// Hits among narinfo and NAR requests together (see [`KindStats::hit_ratio`]).
    pub fn hit_ratio(&self) -> Option<f64> {
        let hits = self.narinfo.hits + self.nar.hits;
        ratio(hits, hits + self.narinfo.misses + self.nar.misses)
    }

    /// Bytes clients got from the local store: upstream traffic saved.
    pub fn bytes_from_cache(&self) -> u64 {
        self.narinfo.bytes_hit + self.nar.bytes_hit
    }

    /// Bytes received from all upstreams.
    pub fn bytes_fetched(&self) -> u64 {
        self.upstreams.iter().map(|u| u.bytes_fetched).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// `upstream_urls` in configuration order: later calls name an upstream by its index here.
    pub fn new(upstream_urls: &[String]) -> Metrics {
        let started = Instant::now();
        let mut labels: Vec<String> = Vec::new();
        let upstreams = upstream_urls
            .iter()
            .map(|url| {
                // Two upstreams on one host must still be two series.
                let base = host_and_path(url);
                let mut label = base.clone();
                let mut n = 2;
                while labels.contains(&label) {
                    label = format!("{base}#{n}");
                    n += 1;
                }
                labels.push(label.clone());
                Upstream {
                    url: url.clone(),
                    shown: crate::url::without_secrets(url),
                    label,
                    fetch: [Histogram::new(), Histogram::new()],
                    errors: Default::default(),
                    bytes: AtomicU64::new(0),
                    last_ok_at: AtomicU64::new(0),
                    last_failed_at: AtomicU64::new(0),
                    last_result: AtomicU8::new(NEVER),
                    lookups: LatencyRing::new(),
                    narinfo_bytes: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                    down: AtomicBool::new(false),
                    consecutive_failures: AtomicU64::new(0),
                    probe_at: AtomicU64::new(0),
                }
            })
            .collect();
        let start_time = process_start_time()
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
        Metrics {
            replica: std::sync::OnceLock::new(),
            started,
            start_time,
            served: Served::new(),
            upstreams,
            downloads_in_flight: AtomicU64::new(0),
            evicted_narinfos: AtomicU64::new(0),
            evicted_nars: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            recent_misses: Mutex::new(Misses::default()),
            history: History::new(),
        }
    }

    /// One narinfo or NAR request answered with HTTP `status`; `bytes` is the body length
    /// announced (0 for HEAD and errors).
    pub fn served(&self, kind: Kind, outcome: Outcome, status: u16, bytes: u64) {
        self.served.counts[Served::slot(kind, outcome, code_index(status))].fetch_add(1, Relaxed);
        let slot = match outcome {
            Outcome::Hit => 0,
            Outcome::Miss => 1,
            Outcome::NotFound | Outcome::Error => return,
        };
        self.served.bytes[kind.index()][slot].fetch_add(bytes, Relaxed);
        self.history.served(self.minute(), slot == 0, bytes);
    }

    /// One request to upstream number `upstream` finished after `elapsed`. `ok` when the
    /// upstream answered as the protocol allows, a clean "not here" included; for a NAR,
    /// `elapsed` covers the whole body. An index out of range is ignored.
    pub fn upstream_request(&self, upstream: usize, kind: Kind, elapsed: Duration, ok: bool) {
        let Some(u) = self.upstreams.get(upstream) else { return };
        u.fetch[kind.index()].observe(elapsed);
        let now = self.now_mark();
        if ok {
            u.last_ok_at.store(now, Relaxed);
            u.last_result.store(LAST_OK, Relaxed);
        } else {
            u.errors[kind.index()].fetch_add(1, Relaxed);
            u.last_failed_at.store(now, Relaxed);
            u.last_result.store(LAST_FAILED, Relaxed);
            *lock(&u.last_error) = Some(format!("{} request failed", kind.label()));
        }
    }

    /// Why the last failed request to `upstream` failed (call after
    /// [`Metrics::upstream_request`] with `ok == false`); shown on the status page.
    pub fn upstream_error_detail(&self, upstream: usize, why: &str) {
        if let Some(u) = self.upstreams.get(upstream) {
            *lock(&u.last_error) = Some(clean(why, MAX_ERROR_LEN));
        }
    }

    /// Upstream `upstream`'s health changed (see `cache::health`): whether it is marked down,
    /// its failures in a row, and when it is probed next.
    pub fn upstream_health(&self, upstream: usize, down: bool, consecutive_failures: u32, probe_in: Option<Duration>) {
        if let Some(u) = self.upstreams.get(upstream) {
            u.down.store(down, Relaxed);
            u.consecutive_failures.store(u64::from(consecutive_failures), Relaxed);
            let at = probe_in.map_or(0, |d| self.now_mark().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)));
            u.probe_at.store(at, Relaxed);
        }
    }

    /// `bytes` more of a NAR received from `upstream` (may be called per chunk).
    pub fn upstream_bytes(&self, upstream: usize, bytes: u64) {
        if let Some(u) = self.upstreams.get(upstream) {
            u.bytes.fetch_add(bytes, Relaxed);
            self.history.fetched(self.minute(), bytes);
        }
    }

    /// A narinfo of `bytes` received from `upstream`.
    pub fn upstream_narinfo_bytes(&self, upstream: usize, bytes: u64) {
        if let Some(u) = self.upstreams.get(upstream) {
            u.narinfo_bytes.fetch_add(bytes, Relaxed);
        }
        self.upstream_bytes(upstream, bytes);
    }

    /// A narinfo lookup at `upstream` got its response head (any status) after `head`: the
    /// upstream's latency, as the status page shows it (NAR times measure size and bandwidth
    /// more than responsiveness).
    pub fn narinfo_lookup(&self, upstream: usize, head: Duration) {
        if let Some(u) = self.upstreams.get(upstream) {
            let ms = head.as_secs_f64() * 1000.0;
            let minute = self.minute();
            u.lookups.observe(minute, ms);
            self.history.lookup(minute, ms);
        }
    }

    /// A narinfo for `store_path` came from `upstream` after `took`; its NAR, `nar`, is
    /// `size` bytes. Listed as a recent miss until its NAR's download ends.
    pub fn narinfo_fetched(&self, upstream: usize, store_path: &str, nar: &str, size: Option<u64>, took: Duration) {
        let what = clean(base_name(store_path), MAX_MISS_LEN);
        let nar = clean(nar, MAX_MISS_LEN);
        let mut misses = lock(&self.recent_misses);
        if misses.pending.len() >= PENDING_NARS {
            misses.pending.pop_front();
        }
        misses.pending.push_back(Pending { nar: nar.clone(), store_path: what.clone(), took });
        let entry = MissEntry {
            at: Instant::now(),
            what,
            nar: Some(nar),
            size,
            took: Some(took),
            upstream: Some(upstream),
            state: MissState::Narinfo,
        };
        misses.push(entry);
    }

    /// The download of NAR `nar` ended after `took`, from `upstream` if known: `bytes`
    /// received, verified if `ok`. Listed under its store path's name when its narinfo was
    /// fetched from upstream while ncps ran, else under its own name.
    pub fn nar_fetched(&self, nar: &str, upstream: Option<usize>, bytes: u64, took: Duration, ok: bool) {
        let nar = clean(nar, MAX_MISS_LEN);
        let mut misses = lock(&self.recent_misses);
        let pending = misses.pending.iter().rposition(|p| p.nar == nar).and_then(|i| misses.pending.remove(i));
        // One row per NAR: this download replaces its narinfo's row, an earlier download of
        // the same NAR, and the request's own row if it was answered before this ended.
        let path = format!("/nar/{nar}");
        misses.shown.retain(|e| e.nar.as_deref() != Some(nar.as_str()) && e.what != path);
        let (what, took) = match pending {
            Some(p) => (p.store_path, p.took + took),
            None => (path, took),
        };
        let entry = MissEntry {
            at: Instant::now(),
            what,
            nar: Some(nar),
            size: Some(bytes),
            took: Some(took),
            upstream,
            state: if ok { MissState::Fetched } else { MissState::Failed },
        };
        misses.push(entry);
    }

    /// The index of the upstream an absolute URL belongs to (NAR URLs come from narinfos,
    /// not from an index): the longest configured URL it starts with.
    pub fn upstream_for_url(&self, url: &str) -> Option<usize> {
        self.upstreams
            .iter()
            .enumerate()
            .filter(|(_, u)| {
                url.strip_prefix(u.url.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || u.url.ends_with('/'))
            })
            .max_by_key(|(_, u)| u.url.len())
            .map(|(i, _)| i)
    }

    pub fn download_started(&self) {
        self.downloads_in_flight.fetch_add(1, Relaxed);
    }

    pub fn download_finished(&self) {
        // Saturating: an unmatched call must not wrap the gauge to 2^64.
        let _ = self.downloads_in_flight.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    /// One eviction pass removed these.
    pub fn evicted(&self, narinfos: u64, nars: u64, bytes: u64) {
        self.evicted_narinfos.fetch_add(narinfos, Relaxed);
        self.evicted_nars.fetch_add(nars, Relaxed);
        self.evicted_bytes.fetch_add(bytes, Relaxed);
    }

    /// Remembers a request no upstream served, for the status page (the last
    /// [`RECENT_MISSES`] misses are kept).
    pub fn recent_miss(&self, what: &str, state: MissState) {
        let mut misses = lock(&self.recent_misses);
        // A NAR whose download failed is listed already, under its store path's name.
        if let Some(nar) = what.strip_prefix("/nar/") {
            if misses.shown.iter().any(|e| e.state == MissState::Failed && e.nar.as_deref() == Some(nar)) {
                return;
            }
        }
        let entry = MissEntry {
            at: Instant::now(),
            what: clean(what, MAX_MISS_LEN),
            nar: None,
            size: None,
            took: None,
            upstream: None,
            state,
        };
        misses.push(entry);
    }

    /// Minutes since start, the clock of [`History`].
    fn minute(&self) -> u64 {
        self.started.elapsed().as_secs() / 60
    }

    fn now_mark(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn secs_since_mark(&self, mark: u64) -> Option<u64> {
        (mark != 0).then(|| self.now_mark().saturating_sub(mark) / 1000)
    }

    pub fn snapshot(&self) -> Snapshot {
        let minute = self.minute();
        let kind = |k: Kind| KindStats {
            hits: self.served.total(k, Outcome::Hit),
            misses: self.served.total(k, Outcome::Miss),
            not_found: self.served.total(k, Outcome::NotFound),
            errors: self.served.total(k, Outcome::Error),
            bytes_hit: self.served.bytes[k.index()][0].load(Relaxed),
            bytes_miss: self.served.bytes[k.index()][1].load(Relaxed),
        };
        let upstreams = self
            .upstreams
            .iter()
            .map(|u| {
                let requests = u.fetch.iter().flat_map(|h| &h.buckets).map(|b| b.load(Relaxed)).sum();
                let lookups: Percentiles = u.lookups.last_hour(minute);
                let nar_secs = u.fetch[Kind::Nar.index()].sum_nanos.load(Relaxed) as f64 / 1e9;
                let nar_bytes = u.bytes.load(Relaxed).saturating_sub(u.narinfo_bytes.load(Relaxed));
                let last_failed = self.secs_since_mark(u.last_failed_at.load(Relaxed));
                let down = u.down.load(Relaxed);
                let probe_at = u.probe_at.load(Relaxed);
                UpstreamStats {
                    url: u.shown.clone(),
                    label: u.label.clone(),
                    requests,
                    errors: u.errors.iter().map(|e| e.load(Relaxed)).sum(),
                    bytes_fetched: u.bytes.load(Relaxed),
                    last_ok_secs_ago: self.secs_since_mark(u.last_ok_at.load(Relaxed)),
                    last_error: last_failed.and_then(|_| lock(&u.last_error).clone()),
                    last_error_secs_ago: last_failed,
                    latency_ms: lookups.quantile_ms(0.5),
                    latency_p95_ms: lookups.quantile_ms(0.95),
                    lookups_last_hour: lookups.count(),
                    throughput: (nar_secs > 0.0 && nar_bytes > 0).then(|| nar_bytes as f64 / nar_secs),
                    healthy: u.last_result.load(Relaxed) != LAST_FAILED && !down,
                    down,
                    consecutive_failures: u.consecutive_failures.load(Relaxed),
                    next_probe_secs: (down && probe_at != 0)
                        .then(|| probe_at.saturating_sub(self.now_mark()).div_ceil(1000)),
                }
            })
            .collect();
        let recent_misses = lock(&self.recent_misses)
            .shown
            .iter()
            .rev()
            .map(|e| RecentMiss {
                what: e.what.clone(),
                size: e.size,
                took_ms: e.took.map(|d| d.as_secs_f64() * 1000.0),
                upstream: e.upstream.and_then(|i| self.upstreams.get(i)).map(|u| u.shown.clone()),
                state: e.state,
                secs_ago: e.at.elapsed().as_secs(),
            })
            .collect();
        Snapshot {
            narinfo: kind(Kind::Narinfo),
            nar: kind(Kind::Nar),
            upstreams,
            downloads_in_flight: self.downloads_in_flight.load(Relaxed),
            evicted_narinfos: self.evicted_narinfos.load(Relaxed),
            evicted_nars: self.evicted_nars.load(Relaxed),
            evicted_bytes: self.evicted_bytes.load(Relaxed),
            recent_misses,
            uptime_secs: self.started.elapsed().as_secs(),
            history: self.history.columns(minute, HISTORY_COLUMNS),
            minutes_per_column: (crate::history::MINUTES / HISTORY_COLUMNS) as u64,
        }
    }

    /// Labels every series with `replica="<addr>"` from now on.
    pub fn set_replica(&self, replica: &str) {
        let _ = self.replica.set(replica.to_string());
    }

    /// The body of `GET /metrics` ([`CONTENT_TYPE`]).
    pub fn render_prometheus(&self, store: &StoreStats) -> String {
        let mut out = Exposition(String::with_capacity(8192), self.replica.get().map(String::as_str));
        self.render_served(&mut out);
        self.render_upstreams(&mut out);

        out.family("ncps_downloads_in_flight", "gauge", "NAR downloads from upstreams in progress.");
        out.sample("ncps_downloads_in_flight", &[], self.downloads_in_flight.load(Relaxed));

        let max = store.max_size.unwrap_or(0);
        for (name, help, value) in [
            ("ncps_store_total_size_bytes", "The total size of all NAR files in the store.", store.size_bytes),
            ("ncps_narinfo_entries", "Narinfos in the store (Go ncps: ncps_narinfo_count).", store.narinfo_count),
            ("ncps_nar_file_entries", "NAR files in the store (Go ncps: ncps_nar_file_count).", store.nar_count),
            ("ncps_cache_max_size_bytes", "Configured maximum cache size in bytes; 0 when there is no limit.", max),
        ] {
            out.family(name, "gauge", help);
            out.sample(name, &[], value);
        }
        out.family(
            "ncps_cache_utilization_ratio",
            "gauge",
            "Store size as a fraction of the maximum size; 0 when there is no limit.",
        );
        let utilization = if max > 0 { store.size_bytes as f64 / max as f64 } else { 0.0 };
        out.sample("ncps_cache_utilization_ratio", &[], utilization);

        for (name, help, counter) in [
            ("ncps_lru_narinfos_evicted_total", "Total number of narinfos evicted by LRU.", &self.evicted_narinfos),
            ("ncps_lru_nar_files_evicted_total", "Total number of NAR files evicted by LRU.", &self.evicted_nars),
            ("ncps_lru_bytes_freed_total", "Total bytes freed by LRU eviction.", &self.evicted_bytes),
        ] {
            out.family(name, "counter", help);
            out.sample(name, &[], counter.load(Relaxed));
        }

        out.family("ncps_build_info", "gauge", "Always 1; the version label says which ncps is running.");
        out.sample("ncps_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

        if crate::otel::enabled() {
            render_otel(&mut out);
        }
        render_process(&mut out, self.start_time);
        out.0
    }

    fn render_served(&self, out: &mut Exposition<'_>) {
        // Go ncps's series: result says where the answer came from, status whether it worked.
        for kind in Kind::ALL {
            let name = format!("ncps_{}_served_total", kind.label());
            let what = match kind {
                Kind::Narinfo => "NAR info files",
                Kind::Nar => "NAR files",
            };
            out.family(&name, "counter", &format!("Counts the number of {what} served."));
            // A path found nowhere counts as a failed miss, as in Go ncps.
            for (result, success, failure) in [
                ("hit", &[Outcome::Hit][..], &[][..]),
                ("miss", &[Outcome::Miss][..], &[Outcome::NotFound, Outcome::Error][..]),
            ] {
                let ok: u64 = success.iter().map(|&o| self.served.total(kind, o)).sum();
                let failed: u64 = failure.iter().map(|&o| self.served.total(kind, o)).sum();
                out.sample(&name, &[("result", result), ("status", "success")], ok);
                out.sample(&name, &[("result", result), ("status", "error")], failed);
            }
        }

        let name = "ncps_cache_requests_total";
        out.family(
            name,
            "counter",
            "Narinfo and NAR requests by kind, result (hit, miss, not_found, error) and HTTP status code.",
        );
        for kind in Kind::ALL {
            for outcome in Outcome::ALL {
                for code in 0..N_CODES {
                    let n = self.served.get(kind, outcome, code);
                    // The table is mostly impossible combinations; only series that happened
                    // are shown (the two above give every kind and result from the start).
                    if n > 0 {
                        let code = code_label(code);
                        out.sample(name, &[("kind", kind.label()), ("result", outcome.label()), ("code", &code)], n);
                    }
                }
            }
        }

        let name = "ncps_served_bytes_total";
        out.family(
            name,
            "counter",
            "Body bytes sent to clients, by kind and result (hit: from the local store, miss: from an upstream).",
        );
        for kind in Kind::ALL {
            for (slot, result) in ["hit", "miss"].iter().enumerate() {
                let n = self.served.bytes[kind.index()][slot].load(Relaxed);
                out.sample(name, &[("kind", kind.label()), ("result", result)], n);
            }
        }
    }

    fn render_upstreams(&self, out: &mut Exposition<'_>) {
        let name = "ncps_upstream_fetched_bytes_total";
        out.family(name, "counter", "Bytes received from each upstream cache.");
        for u in &self.upstreams {
            out.sample(name, &[("upstream_hostname", &u.label)], u.bytes.load(Relaxed));
        }

        for kind in Kind::ALL {
            let name = format!("ncps_upstream_{}_fetch_duration_seconds", kind.label());
            let help = match kind {
                Kind::Narinfo => "Duration of narinfo fetches from upstream caches.",
                Kind::Nar => "Duration of NAR fetches from upstream caches, whole body included.",
            };
            out.family(&name, "histogram", help);
            for u in &self.upstreams {
                out.histogram(&name, &u.label, &u.fetch[kind.index()]);
            }
        }

        let name = "ncps_upstream_errors_total";
        out.family(name, "counter", "Failed requests to each upstream cache, by kind.");
        for u in &self.upstreams {
            for kind in Kind::ALL {
                let n = u.errors[kind.index()].load(Relaxed);
                out.sample(name, &[("upstream_hostname", &u.label), ("kind", kind.label())], n);
            }
        }

        let name = "ncps_upstream_healthy";
        out.family(name, "gauge", "1 when the last request to the upstream succeeded (or none was made yet), else 0.");
        let mut healthy = 0u64;
        for u in &self.upstreams {
            let ok = u.last_result.load(Relaxed) != LAST_FAILED;
            healthy += u64::from(ok);
            out.sample(name, &[("upstream_hostname", &u.label)], u64::from(ok));
        }
        let name = "ncps_upstream_up";
        out.family(name, "gauge", "0 while the upstream is marked down (skipped until a probe of /nix-cache-info answers), else 1.");
        for u in &self.upstreams {
            out.sample(name, &[("upstream_hostname", &u.label)], u64::from(!u.down.load(Relaxed)));
        }
        let name = "ncps_upstream_consecutive_failures";
        out.family(name, "gauge", "Failed requests (unreachable, timed out, 5xx) to the upstream since its last success.");
        for u in &self.upstreams {
            out.sample(name, &[("upstream_hostname", &u.label)], u.consecutive_failures.load(Relaxed));
        }
        // Go ncps calls these ncps_upstream_count_total and ncps_upstream_count_healthy; promtool
        // rejects both suffixes on a gauge.
        out.family("ncps_upstreams_configured", "gauge", "Total number of configured upstream caches.");
        out.sample("ncps_upstreams_configured", &[], self.upstreams.len());
        out.family("ncps_upstreams_healthy", "gauge", "Number of healthy upstream caches.");
        out.sample("ncps_upstreams_healthy", &[], healthy);
    }
}

/// Keeps at most `max` bytes (cut at a character boundary) and no control characters.
fn clean(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// The label for an upstream: its host, as Go ncps's `upstream_hostname`, plus port and path
/// when the URL has them, so two caches on one host stay apart.
fn host_and_path(url: &str) -> String {
    let shown = crate::url::without_secrets(url);
    match shown.split_once("://") {
        Some((_, rest)) => rest.to_string(),
        None => shown,
    }
}

/// What the OpenTelemetry exporter sent and lost (with `--otel-enabled`).
fn render_otel(out: &mut Exposition<'_>) {
    let s = &crate::otel::export::STATS;
    for (name, help, series) in [
        (
            "ncps_otel_exported_total",
            "Spans, log records and metrics the OpenTelemetry collector accepted.",
            [("spans", &s.exported_spans), ("logs", &s.exported_logs), ("metrics", &s.exported_metrics)],
        ),
        (
            "ncps_otel_dropped_total",
            "Spans, log records and metrics dropped: queue full, or the collector away or refusing.",
            [("spans", &s.dropped_spans), ("logs", &s.dropped_logs), ("metrics", &s.dropped_metrics)],
        ),
    ] {
        out.family(name, "counter", help);
        for (signal, n) in series {
            out.sample(name, &[("signal", signal)], n.load(Relaxed));
        }
    }
    out.family("ncps_otel_export_failures_total", "counter", "Export requests to the OpenTelemetry collector that failed.");
    out.sample("ncps_otel_export_failures_total", &[], s.failed_exports.load(Relaxed));
}

/// Writes the text exposition format; the second field is the `replica` label every sample
/// gets, if any.
struct Exposition<'a>(String, Option<&'a str>);

impl Exposition<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        let replica = self.1.map(|r| ("replica", r));
        if !labels.is_empty() || replica.is_some() {
            self.0.push('{');
            for (i, (k, v)) in replica.iter().chain(labels.iter()).enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                self.0.push_str(k);
                self.0.push_str("=\"");
                push_label_value(&mut self.0, v);
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, upstream: &str, h: &Histogram) {
        // Read each bucket once, so the count always equals the +Inf bucket even while
        // requests are being recorded.
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, n) in counts.iter().enumerate() {
            cumulative += n;
            let le = BUCKETS.get(i).map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            self.sample(&bucket, &[("upstream_hostname", upstream), ("le", &le)], cumulative);
        }
        let sum = h.sum_nanos.load(Relaxed) as f64 / 1e9;
        self.sample(&format!("{name}_sum"), &[("upstream_hostname", upstream)], sum);
        self.sample(&format!("{name}_count"), &[("upstream_hostname", upstream)], cumulative);
    }
}

/// Escapes a label value as the text format requires: backslash, double quote, newline.
fn push_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Process metrics under the names every Prometheus client uses, read from `/proc`. A figure
/// that cannot be read is left out rather than reported as 0.
fn render_process(out: &mut Exposition<'_>, start_time: f64) {
    if let Some(rss) = resident_memory() {
        out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        out.sample("process_resident_memory_bytes", &[], rss);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        out.family("process_open_fds", "gauge", "Number of open file descriptors.");
        out.sample("process_open_fds", &[], dir.count());
    }
    if let Some(max) = max_fds() {
        out.family("process_max_fds", "gauge", "Maximum number of open file descriptors.");
        out.sample("process_max_fds", &[], max);
    }
    out.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.");
    out.sample("process_start_time_seconds", &[], format_args!("{start_time:.2}"));
}

fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Clock ticks per second in `/proc/<pid>/stat`: the kernel reports these in USER_HZ, which
/// is 100 on every architecture Linux still supports but alpha.
const USER_HZ: f64 = 100.0;

/// Boot time (`btime` in `/proc/stat`) plus the process start (field 22 of
/// `/proc/self/stat`, in clock ticks since boot).
fn process_start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 2 is the command name in parentheses and may itself contain spaces and ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after_comm.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(btime as f64 + ticks as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn upstreams() -> Vec<String> {
        vec![
            "https://cache.nixos.org".to_string(),
            "http://user:secret@mirror.lan:8080/nix?token=abc".to_string(),
            "https://cache.nixos.org".to_string(),
            "http://evil\"host\\\n/x".to_string(),
        ]
    }

    fn busy() -> Metrics {
        let m = Metrics::new(&upstreams());
        m.served(Kind::Narinfo, Outcome::Hit, 200, 500);
        m.served(Kind::Narinfo, Outcome::Miss, 200, 600);
        m.served(Kind::Narinfo, Outcome::NotFound, 404, 0);
        m.served(Kind::Nar, Outcome::Hit, 200, 1 << 20);
        m.served(Kind::Nar, Outcome::Error, 500, 0);
        m.served(Kind::Nar, Outcome::Miss, 299, 10);
        m.upstream_request(0, Kind::Narinfo, Duration::from_millis(40), true);
        m.upstream_request(0, Kind::Narinfo, Duration::from_millis(3), true);
        m.narinfo_lookup(0, Duration::from_millis(40));
        m.narinfo_lookup(0, Duration::from_millis(3));
        m.upstream_request(1, Kind::Nar, Duration::from_secs(90), false);
        m.upstream_error_detail(1, "connection refused\n<script>");
        m.upstream_request(9, Kind::Nar, Duration::from_secs(1), true);
        m.upstream_bytes(0, 4096);
        m.evicted(1, 2, 300);
        m
    }

    /// A small parser for what promtool would check structurally: every sample belongs to a
    /// family with HELP and TYPE, no series appears twice, label values are well escaped, and
    /// histograms are cumulative with count == +Inf.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps = HashSet::new();
        let mut series = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(helps.insert(name.to_string()), "HELP twice for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helps.contains(name), "TYPE before HELP for {name}");
                assert!(types.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice for {name}");
                continue;
            }
            assert!(!line.starts_with('#') && !line.is_empty(), "stray line {line:?}");
            let (key, value) = line.rsplit_once(' ').unwrap();
            let value: f64 =
                value.parse().unwrap_or_else(|_| if value == "+Inf" { f64::INFINITY } else { panic!("{line}") });
            let name = key.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.get(*f).is_some_and(|t| t == "histogram")))
                .unwrap_or(name);
            assert!(types.contains_key(family), "sample without TYPE: {line}");
            if let Some(labels) = key.strip_prefix(name) {
                check_labels(labels);
            }
            assert!(series.insert(key.to_string(), value).is_none(), "series twice: {key}");
        }
        series
    }

    fn check_labels(labels: &str) {
        if labels.is_empty() {
            return;
        }
        let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).unwrap();
        let mut chars = inner.chars().peekable();
        while chars.peek().is_some() {
            let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "label name {name:?}");
            assert_eq!(chars.next(), Some('"'));
            loop {
                match chars.next().unwrap() {
                    '\\' => assert!(matches!(chars.next(), Some('\\' | '"' | 'n'))),
                    '"' => break,
                    c => assert!(c != '\n'),
                }
            }
            if chars.peek() == Some(&',') {
                chars.next();
            }
        }
    }

    #[test]
    fn exposition_is_well_formed_and_counts_add_up() {
        let m = busy();
        let store = StoreStats { size_bytes: 50, nar_count: 2, narinfo_count: 3, max_size: Some(100) };
        let text = m.render_prometheus(&store);
        let s = parse(&text);
        let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("missing {k}\n{text}"));
        assert_eq!(get(r#"ncps_narinfo_served_total{result="hit",status="success"}"#), 1.0);
        assert_eq!(get(r#"ncps_narinfo_served_total{result="miss",status="success"}"#), 1.0);
        assert_eq!(get(r#"ncps_narinfo_served_total{result="miss",status="error"}"#), 1.0);
        assert_eq!(get(r#"ncps_nar_served_total{result="miss",status="error"}"#), 1.0);
        assert_eq!(get(r#"ncps_nar_served_total{result="miss",status="success"}"#), 1.0);
        assert_eq!(get(r#"ncps_cache_requests_total{kind="nar",result="miss",code="other"}"#), 1.0);
        assert_eq!(get(r#"ncps_served_bytes_total{kind="nar",result="hit"}"#), 1048576.0);
        assert_eq!(get(r#"ncps_upstream_fetched_bytes_total{upstream_hostname="cache.nixos.org"}"#), 4096.0);
        assert_eq!(
            get(r#"ncps_upstream_narinfo_fetch_duration_seconds_count{upstream_hostname="cache.nixos.org"}"#),
            2.0
        );
        assert_eq!(
            get(
                r#"ncps_upstream_narinfo_fetch_duration_seconds_bucket{upstream_hostname="cache.nixos.org",le="0.005"}"#
            ),
            1.0
        );
        assert!(
            (get(r#"ncps_upstream_narinfo_fetch_duration_seconds_sum{upstream_hostname="cache.nixos.org"}"#) - 0.043)
                .abs()
                < 1e-9
        );
        // 90 s is above the last bound: only +Inf counts it.
        let nar = r#"ncps_upstream_nar_fetch_duration_seconds_bucket{upstream_hostname="mirror.lan:8080/nix","#;
        assert_eq!(get(&format!("{nar}le=\"60\"}}")), 0.0);
        assert_eq!(get(&format!("{nar}le=\"+Inf\"}}")), 1.0);
        assert_eq!(get(r#"ncps_upstream_errors_total{upstream_hostname="mirror.lan:8080/nix",kind="nar"}"#), 1.0);
        assert_eq!(get(r#"ncps_upstream_healthy{upstream_hostname="mirror.lan:8080/nix"}"#), 0.0);
        assert_eq!(get(r#"ncps_upstream_healthy{upstream_hostname="cache.nixos.org#2"}"#), 1.0);
        assert_eq!(get("ncps_upstreams_healthy"), 3.0);
        assert_eq!(get("ncps_cache_utilization_ratio"), 0.5);
        assert_eq!(get("ncps_lru_bytes_freed_total"), 300.0);
        assert!(get("process_start_time_seconds") > 1.5e9);
        assert!(get("process_resident_memory_bytes") > 0.0);
        assert!(!text.contains("secret") && !text.contains("token"), "credentials leaked into labels");
        // Buckets are cumulative.
        let mut last = 0.0;
        for b in BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".to_string()]) {
            let v = get(&format!(
                "ncps_upstream_narinfo_fetch_duration_seconds_bucket{{upstream_hostname=\"cache.nixos.org\",le=\"{b}\"}}"
            ));
            assert!(v >= last);
            last = v;
        }
    }

    #[test]
    fn a_replicas_series_all_carry_its_replica_label_and_still_parse() {
        let m = busy();
        m.set_replica("10.0.0.5:8501");
        let text = m.render_prometheus(&StoreStats::default());
        parse(&text);
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            assert!(line.contains("{replica=\"10.0.0.5:8501\""), "{line}");
        }
    }

    #[test]
    fn hostile_label_values_are_escaped() {
        let m = busy();
        let text = m.render_prometheus(&StoreStats::default());
        parse(&text);
        assert!(text.contains(r#"upstream_hostname="evil\"host\\\n/x""#), "{text}");
    }

    #[test]
    fn an_idle_cache_exports_every_ncps_series_at_zero() {
        let text = Metrics::new(&[]).render_prometheus(&StoreStats::default());
        let s = parse(&text);
        for k in [
            r#"ncps_nar_served_total{result="hit",status="success"}"#,
            r#"ncps_narinfo_served_total{result="miss",status="error"}"#,
            "ncps_lru_narinfos_evicted_total",
            "ncps_cache_max_size_bytes",
            "ncps_downloads_in_flight",
        ] {
            assert_eq!(s.get(k), Some(&0.0), "{k}");
        }
    }

    #[test]
    fn snapshot_reports_health_latency_and_misses() {
        let m = busy();
        for i in 0..25 {
            m.recent_miss(&format!("miss-{i}"), MissState::NotFound);
        }
        m.recent_miss(&"x".repeat(1000), MissState::Unavailable);
        m.download_started();
        m.download_finished();
        m.download_finished();
        let s = m.snapshot();
        assert_eq!(s.downloads_in_flight, 0);
        assert_eq!(s.recent_misses.len(), RECENT_MISSES);
        assert!(s.recent_misses[0].what.len() <= MAX_MISS_LEN + '…'.len_utf8());
        assert_eq!(s.recent_misses[1].what, "miss-24");
        assert_eq!((s.narinfo.hits, s.narinfo.misses, s.narinfo.not_found), (1, 1, 1));
        assert_eq!(s.narinfo.hit_ratio(), Some(0.5));
        assert_eq!(s.bytes_from_cache(), 500 + (1 << 20));
        assert_eq!(s.bytes_fetched(), 4096);
        let up = &s.upstreams[0];
        assert!(up.healthy && up.last_error.is_none() && up.last_ok_secs_ago == Some(0));
        // Lookups of 40 and 3 ms: the median is the fast one, p95 the slow one (each
        // within its histogram bucket's factor of 1.59).
        let (p50, p95) = (up.latency_ms.unwrap(), up.latency_p95_ms.unwrap());
        assert!(p50 > 3.0 / 1.6 && p50 < 3.0 * 1.6, "{p50}");
        assert!(p95 > 40.0 / 1.6 && p95 < 40.0 * 1.6, "{p95}");
        assert_eq!(up.lookups_last_hour, 2);
        assert_eq!(up.throughput, None, "no NAR fetched from it");
        let bad = &s.upstreams[1];
        assert!(!bad.healthy);
        assert_eq!(bad.url, "http://mirror.lan:8080/nix");
        assert_eq!(bad.last_error.as_deref(), Some("connection refused <script>"));
        assert_eq!(s.upstreams[2].label, "cache.nixos.org#2");
        assert!(s.upstreams[2].healthy && s.upstreams[2].latency_ms.is_none());
    }

    #[test]
    fn a_nar_download_is_listed_under_its_store_path_name_with_size_time_and_upstream() {
        let m = Metrics::new(&["http://user:pw@up.lan:8080".into()]);
        let nar = "0kznl4zwfh8brk40bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.nar.xz";
        m.narinfo_fetched(0, "/nix/store/abcdabcdabcdabcdabcdabcdabcdabcd-fixture-big", nar, Some(1 << 26), Duration::from_millis(4));
        let s = m.snapshot();
        assert_eq!(s.recent_misses.len(), 1);
        let r = &s.recent_misses[0];
        assert_eq!((r.what.as_str(), r.state, r.size), ("abcdabcdabcdabcdabcdabcdabcdabcd-fixture-big", MissState::Narinfo, Some(1 << 26)));
        assert_eq!(r.upstream.as_deref(), Some("http://up.lan:8080"), "shown without credentials");
        // Other misses come between the narinfo and its NAR, as in `nix copy`.
        for i in 0..30 {
            m.narinfo_fetched(0, &format!("/nix/store/{i:032}-other"), &format!("{i}.nar"), None, Duration::ZERO);
        }
        m.nar_fetched(nar, Some(0), 1 << 26, Duration::from_millis(996), true);
        let s = m.snapshot();
        let r = &s.recent_misses[0];
        assert_eq!((r.what.as_str(), r.state, r.size), ("abcdabcdabcdabcdabcdabcdabcdabcd-fixture-big", MissState::Fetched, Some(1 << 26)));
        assert!((r.took_ms.unwrap() - 1000.0).abs() < 1e-6, "narinfo lookup plus NAR download");
        assert_eq!(s.recent_misses.iter().filter(|r| r.what.ends_with("fixture-big")).count(), 1);
        // A NAR no narinfo fetched here points at keeps its own name.
        m.nar_fetched("zzz.nar", None, 10, Duration::from_millis(1), false);
        let r = &m.snapshot().recent_misses[0];
        assert_eq!((r.what.as_str(), r.state, r.upstream.as_deref()), ("/nar/zzz.nar", MissState::Failed, None));
        // A failed download is one row, whether the request's answer is recorded before the
        // download's end or after it.
        let rows = |what: &str| m.snapshot().recent_misses.iter().filter(|r| r.what == what).count();
        m.recent_miss("/nar/zzz.nar", MissState::Unavailable);
        assert_eq!(rows("/nar/zzz.nar"), 1);
        m.recent_miss("/nar/yyy.nar", MissState::Unavailable);
        m.nar_fetched("yyy.nar", None, 0, Duration::ZERO, false);
        assert_eq!(rows("/nar/yyy.nar"), 1);
        assert_eq!(m.snapshot().recent_misses[0].state, MissState::Failed);
    }

    #[test]
    fn throughput_is_nar_bytes_over_nar_time_and_narinfos_do_not_count() {
        let m = Metrics::new(&["http://a".into()]);
        m.upstream_narinfo_bytes(0, 1000);
        m.upstream_request(0, Kind::Narinfo, Duration::from_secs(5), true);
        m.upstream_bytes(0, 8 << 20);
        m.upstream_request(0, Kind::Nar, Duration::from_secs(2), true);
        let u = &m.snapshot().upstreams[0];
        assert_eq!(u.bytes_fetched, (8 << 20) + 1000);
        assert!((u.throughput.unwrap() - (4 << 20) as f64).abs() < 1.0, "{:?}", u.throughput);
        assert_eq!(u.latency_ms, None, "latency comes from response heads, not whole requests");
    }

    #[test]
    fn the_history_records_what_metrics_count() {
        let m = Metrics::new(&["http://a".into()]);
        m.served(Kind::Nar, Outcome::Hit, 200, 700);
        m.served(Kind::Narinfo, Outcome::Miss, 200, 50);
        m.served(Kind::Narinfo, Outcome::NotFound, 404, 0);
        m.upstream_narinfo_bytes(0, 50);
        m.upstream_bytes(0, 300);
        m.narinfo_lookup(0, Duration::from_millis(7));
        let s = m.snapshot();
        assert_eq!(s.history.len(), HISTORY_COLUMNS);
        assert_eq!(s.minutes_per_column, 5);
        let now = s.history.last().unwrap();
        assert_eq!((now.hits, now.misses, now.bytes_cache, now.bytes_fetched), (1, 1, 700, 350));
        assert_eq!(now.latency.count(), 1);
        assert!(s.history[..HISTORY_COLUMNS - 1].iter().all(crate::history::Totals::is_idle));
    }

    #[test]
    fn an_upstream_marked_down_is_exported_as_down_with_its_failures_and_next_probe() {
        let m = busy();
        m.upstream_health(2, true, 4, Some(Duration::from_millis(3500)));
        let s = m.snapshot();
        let down = &s.upstreams[2];
        assert!(down.down && !down.healthy, "a down upstream is not healthy, whatever its last request did");
        assert_eq!((down.consecutive_failures, down.next_probe_secs), (4, Some(4)));
        let text = m.render_prometheus(&StoreStats::default());
        let series = parse(&text);
        assert_eq!(series.get(r#"ncps_upstream_up{upstream_hostname="cache.nixos.org#2"}"#), Some(&0.0));
        assert_eq!(series.get(r#"ncps_upstream_up{upstream_hostname="cache.nixos.org"}"#), Some(&1.0));
        assert_eq!(series.get(r#"ncps_upstream_consecutive_failures{upstream_hostname="cache.nixos.org#2"}"#), Some(&4.0));
        // Back up: no probe pending, the count is what the board says.
        m.upstream_health(2, false, 0, None);
        let s = m.snapshot();
        assert!(!s.upstreams[2].down && s.upstreams[2].next_probe_secs.is_none() && s.upstreams[2].healthy);
    }

    #[test]
    fn nar_urls_are_matched_to_their_upstream() {
        let m = Metrics::new(&["http://a:1".into(), "http://a:1/sub".into(), "http://b".into()]);
        assert_eq!(m.upstream_for_url("http://a:1/nar/x.nar"), Some(0));
        assert_eq!(m.upstream_for_url("http://a:1/sub/nar/x.nar"), Some(1));
        assert_eq!(m.upstream_for_url("http://a:10/nar/x.nar"), None);
        assert_eq!(m.upstream_for_url("http://bb/nar/x.nar"), None);
    }

    #[test]
    fn process_start_time_is_in_the_past() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        let t = process_start_time().expect("/proc readable");
        assert!(t <= now + 1.0 && t > now - 86400.0 * 365.0, "{t} vs {now}");
    }
}
