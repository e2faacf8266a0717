//! The page a person sees at `GET /`, and its JSON twin for scripts.
//!
//! The page answers the questions someone opening the cache in a browser has: is it working
//! (hit ratio, upstream health), is it worth it (bytes served from the store against bytes
//! fetched), is it full (size against the limit), and how do I use it (the nix.conf lines,
//! ready to copy). It is one self-contained document, CSS inline and no script, so it works
//! offline and under a strict Content-Security-Policy ([`CONTENT_SECURITY_POLICY`]).
//!
//! Everything on it that ncps did not write itself (upstream URLs and errors, names of missed
//! paths, the request's Host header) is escaped, and the Host header is used only if it looks
//! like a host. The HTML comes from small templates in `src/status/` ([`crate::template`]:
//! text is escaped by type, markup only comes from templates); the JSON is written by hand,
//! its shape being fixed and small. The last 24 hours ([`crate::history`]) are three inline
//! SVG charts of 288 five-minute columns, one step-outline `<path>` per series, so a full day
//! of traffic keeps the page near 26 KB.

use crate::history::Totals;
use crate::metrics::{MissState, RecentMiss, Snapshot, StoreStats, UpstreamStats};
use crate::template::{self, Html};
use std::fmt::Write as _;

/// The `Content-Security-Policy` to send with [`render_html`]: the page needs inline styles
/// and nothing else.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub const HTML_CONTENT_TYPE: &str = "text/html; charset=utf-8";
pub const JSON_CONTENT_TYPE: &str = "application/json";

pub struct StatusInput<'a> {
    /// `--cache-hostname`.
    pub hostname: &'a str,
    /// `name:base64`, as `/pubkey` serves it.
    pub public_key: &'a str,
    /// The request's `Host` header, which says how this client reached ncps.
    pub host_header: Option<&'a str>,
    pub snapshot: &'a Snapshot,
    pub store: &'a StoreStats,
}

/// Whether a request's `Accept` header asks for HTML (browsers do; curl and Nix do not, and
/// get JSON as from Go ncps).
pub fn wants_html(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=").and_then(|q| q.trim().parse::<f64>().ok()).is_some_and(|q| q <= 0.0)
        });
        !refused && (media.eq_ignore_ascii_case("text/html") || media.eq_ignore_ascii_case("application/xhtml+xml"))
    })
}

/// The URL clients should use: the Host header this client used when it is a plausible
/// `host[:port]`, else the configured hostname.
pub fn substituter_url(s: &StatusInput) -> String {
    let host = s.host_header.map(str::trim).filter(|h| plausible_host(h)).unwrap_or(s.hostname);
    format!("http://{host}")
}

fn plausible_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'))
}

/// The nix.conf lines that make a machine use this cache.
fn nix_conf(s: &StatusInput) -> String {
    format!("substituters = {}\ntrusted-public-keys = {}", substituter_url(s), s.public_key)
}

/// The HTML status page.
pub fn render_html(s: &StatusInput) -> String {
    let snap = s.snapshot;
    let failing = snap.upstreams.iter().filter(|u| !u.healthy).count();
    let (pill, health) = match (failing, snap.upstreams.len()) {
        (_, 0) => ("idle", "no upstreams".to_string()),
        (0, 1) => ("ok", "upstream healthy".to_string()),
        (0, _) => ("ok", "all upstreams healthy".to_string()),
        (f, n) => ("bad", format!("{f} of {n} upstreams failing")),
    };
    let page = template::render(
        PAGE,
        &[
            ("host", s.hostname.into()),
            ("css", Html::from_static(CSS).into()),
            ("pill", pill.into()),
            ("health", health.into()),
            ("uptime", duration(snap.uptime_secs).into()),
            ("cards", cards(s).into()),
            ("charts", charts(snap).into()),
            ("nix_conf", nix_conf(s).into()),
            ("upstreams", upstreams(snap).into()),
            ("misses", misses(snap).into()),
            ("url", substituter_url(s).into()),
        ],
    );
    page.into_string()
}

const PAGE: &str = include_str!("status/page.html");
const CSS: &str = include_str!("status/page.css");
const CARD: &str = include_str!("status/card.html");
const BAR: &str = include_str!("status/bar.html");
const CHART: &str = include_str!("status/chart.html");
const PATH: &str = include_str!("status/path.html");
const UPSTREAMS: &str = include_str!("status/upstreams.html");
const UPSTREAM_ROW: &str = include_str!("status/upstream_row.html");
const NOTE: &str = include_str!("status/note.html");
const MISSES: &str = include_str!("status/misses.html");
const MISS_ROW: &str = include_str!("status/miss_row.html");
const EMPTY: &str = include_str!("status/empty.html");

/// `<br>` between two lines of a card's small print.
fn lines(parts: &[String]) -> Html {
    Html::join(parts.iter().enumerate().map(|(i, p)| {
        let text = template::render("{{t}}", &[("t", p.as_str().into())]);
        if i == 0 {
            text
        } else {
            Html::join([Html::from_static("<br>"), text])
        }
    }))
}

fn note(class: &'static str, text: String) -> Html {
    template::render(NOTE, &[("class", class.into()), ("text", text.into())])
}

fn empty(text: &str) -> Html {
    template::render(EMPTY, &[("text", text.into())])
}

fn cards(s: &StatusInput) -> Html {
    let snap = s.snapshot;
    let ratio = snap.hit_ratio().map_or_else(|| "–".to_string(), percent);
    let per_kind = |k: &crate::metrics::KindStats| k.hit_ratio().map_or_else(|| "–".to_string(), percent);
    let st = s.store;
    let (limit, fill) = match st.max_size {
        Some(max) if max > 0 => {
            let f = st.size_bytes as f64 / max as f64;
            (format!("of {} ({})", bytes(max), percent(f)), Some(f))
        }
        _ => ("no size limit".to_string(), None),
    };
    let mut store_lines = vec![
        limit,
        format!("{} · {}", plural(st.nar_count, "NAR", "NARs"), plural(st.narinfo_count, "narinfo", "narinfos")),
    ];
    if snap.evicted_nars > 0 {
        store_lines.push(format!("evicted {} ({})", plural(snap.evicted_nars, "NAR", "NARs"), bytes(snap.evicted_bytes)));
    }
    Html::join([
        card(
            "Hit ratio",
            ratio,
            &[
                format!(
                    "{} · {}",
                    plural(snap.narinfo.hits + snap.nar.hits, "hit", "hits"),
                    plural(snap.narinfo.misses + snap.nar.misses, "miss", "misses")
                ),
                format!("narinfo {} · NAR {}", per_kind(&snap.narinfo), per_kind(&snap.nar)),
            ],
            None,
        ),
        card(
            "Served from cache",
            bytes(snap.bytes_from_cache()),
            &[
                "upstream traffic saved".to_string(),
                format!("{} served while fetching", bytes(snap.narinfo.bytes_miss + snap.nar.bytes_miss)),
            ],
            None,
        ),
        card(
            "Fetched from upstreams",
            bytes(snap.bytes_fetched()),
            &[
                format!("{} in progress", plural(snap.downloads_in_flight, "download", "downloads")),
                format!(
                    "{} · {}",
                    plural(snap.narinfo.not_found + snap.nar.not_found, "path found nowhere", "paths found nowhere"),
                    plural(snap.narinfo.errors + snap.nar.errors, "error", "errors"),
                ),
            ],
            None,
        ),
        card("Store", bytes(st.size_bytes), &store_lines, fill),
    ])
}

fn card(title: &str, big: String, sub: &[String], fill: Option<f64>) -> Html {
    let bar = fill.map_or_else(Html::default, |f| {
        let width = format!("{:.1}", (f * 100.0).clamp(0.0, 100.0));
        template::render(BAR, &[("class", if f >= 0.95 { " full" } else { "" }.into()), ("width", width.into())])
    });
    template::render(
        CARD,
        &[("title", title.into()), ("big", big.into()), ("bar", bar.into()), ("sub", lines(sub).into())],
    )
}

/// Height of a chart in SVG units (its width is one unit per column).
const CHART_HEIGHT: f64 = 64.0;

/// One `<path>` for a series: a step outline, one unit per column, of `offsets` (the bar of
/// each column, from `base`: negative draws upwards, 0 or `None` nothing). Steps only where
/// the height changes, so a full day of one series is a few KB and the page stays well under
/// 64 KiB whatever the traffic.
fn bars(class: &str, base: f64, offsets: impl Iterator<Item = Option<f64>>) -> Html {
    let mut d = format!("M0 {base:.1}");
    let (mut prev, mut any, mut n) = (0.0, false, 0);
    for (x, off) in offsets.enumerate() {
        let off = off.filter(|o| o.is_finite() && o.abs() >= 0.05).unwrap_or(0.0);
        if (off - prev).abs() >= 0.05 {
            let _ = write!(d, "H{x}V{:.1}", base + off);
            prev = off;
            any |= off != 0.0;
        }
        n = x + 1;
    }
    if !any {
        return Html::default();
    }
    let _ = write!(d, "H{n}V{base:.1}Z");
    template::render(PATH, &[("class", class.into()), ("d", d.into())])
}

struct Chart<'a> {
    title: &'a str,
    figure: String,
    label: String,
    scale: String,
    legend: Html,
    paths: Html,
    axis: f64,
}

fn chart(c: Chart, columns: usize) -> Html {
    template::render(
        CHART,
        &[
            ("title", c.title.into()),
            ("figure", c.figure.into()),
            ("label", c.label.into()),
            ("width", columns.max(1).to_string().into()),
            ("height", format!("{CHART_HEIGHT}").into()),
            ("axis", format!("{:.1}", c.axis).into()),
            ("paths", c.paths.into()),
            ("scale", c.scale.into()),
            ("legend", c.legend.into()),
        ],
    )
}

/// The three charts of the last 24 hours, from [`Snapshot::history`] (empty: flat charts).
fn charts(snap: &Snapshot) -> Html {
    let cols = &snap.history;
    let n = cols.len().max(crate::metrics::HISTORY_COLUMNS);
    let mut day = Totals::default();
    for c in cols {
        day.add(c);
    }
    let per = snap.minutes_per_column.max(1);
    let h = CHART_HEIGHT;

    // Hit ratio: a grey bar for every column with traffic, the ratio over it.
    let traffic = bars("traffic", h, cols.iter().map(|c| c.hit_ratio().map(|_| -h)));
    let ratio = bars("ratio", h, cols.iter().map(|c| c.hit_ratio().map(|r| -r * h)));
    let hits = chart(
        Chart {
            title: "Hit ratio",
            figure: day.hit_ratio().map_or_else(|| "no requests".to_string(), percent),
            label: format!(
                "Hit ratio per {per} minutes over the last 24 hours: {} of {} requests answered from the store",
                count(day.hits),
                count(day.hits + day.misses)
            ),
            scale: "scale 0–100%".to_string(),
            legend: Html::from_static("<span class=\"key-ratio\"></span>hits among hits and misses"),
            paths: Html::join([traffic, ratio]),
            axis: h - 0.5,
        },
        n,
    );

    // Bytes: served from the store upwards, fetched from upstreams downwards, one scale.
    let max = cols.iter().map(|c| c.bytes_cache.max(c.bytes_fetched)).max().unwrap_or(0);
    let half = h / 2.0;
    let scaled = |b: u64| if max == 0 { 0.0 } else { b as f64 / max as f64 * half };
    let cache = bars("cache", half, cols.iter().map(|c| Some(-scaled(c.bytes_cache))));
    let fetched = bars("fetched", half, cols.iter().map(|c| Some(scaled(c.bytes_fetched))));
    let traffic = chart(
        Chart {
            title: "Bytes",
            figure: format!("{} from cache · {} fetched", bytes(day.bytes_cache), bytes(day.bytes_fetched)),
            label: format!(
                "Bytes per {per} minutes over the last 24 hours: {} served from the store (up), {} fetched from upstreams (down)",
                bytes(day.bytes_cache),
                bytes(day.bytes_fetched)
            ),
            scale: if max == 0 { "no traffic".to_string() } else { format!("scale ± {} per {per} min", bytes(max)) },
            legend: Html::from_static(
                "<span class=\"key-cache\"></span>served from cache<span class=\"key-fetched\"></span>fetched from upstreams",
            ),
            paths: Html::join([cache, fetched]),
            axis: half,
        },
        n,
    );

    // Upstream latency: p95 behind p50, on the scale of the highest p95.
    let quantiles: Vec<(Option<f64>, Option<f64>)> =
        cols.iter().map(|c| (c.latency.quantile_ms(0.5), c.latency.quantile_ms(0.95))).collect();
    let top = quantiles.iter().filter_map(|q| q.1).fold(0.0, f64::max);
    let y = |ms: f64| if top > 0.0 { -ms / top * h } else { 0.0 };
    let p95 = bars("p95", h, quantiles.iter().map(|q| q.1.map(y)));
    let p50 = bars("p50", h, quantiles.iter().map(|q| q.0.map(y)));
    let figure = match (day.latency.quantile_ms(0.5), day.latency.quantile_ms(0.95)) {
        (Some(a), Some(b)) => format!("p50 {} · p95 {}", millis(a), millis(b)),
        _ => "no lookups".to_string(),
    };
    let latency = chart(
        Chart {
            title: "Upstream latency",
            label: format!(
                "Time to the response head of upstream narinfo lookups per {per} minutes over the last 24 hours ({}): {figure}",
                plural(day.latency.count(), "lookup", "lookups")
            ),
            figure,
            scale: if top > 0.0 { format!("scale 0–{}", millis(top)) } else { "no lookups".to_string() },
            legend: Html::from_static(
                "<span class=\"key-p50\"></span>p50<span class=\"key-p95\"></span>p95 of narinfo response heads",
            ),
            paths: Html::join([p95, p50]),
            axis: h - 0.5,
        },
        n,
    );
    Html::join([hits, traffic, latency])
}

fn upstreams(snap: &Snapshot) -> Html {
    if snap.upstreams.is_empty() {
        return empty("No upstream caches configured.");
    }
    let rows = Html::join(snap.upstreams.iter().map(upstream_row));
    template::render(UPSTREAMS, &[("rows", rows.into())])
}

fn upstream_row(u: &UpstreamStats) -> Html {
    let (dot, word) = match (u.down, u.healthy, u.requests) {
        (true, _, _) => ("bad", "down"),
        (_, false, _) => ("bad", "failing"),
        (_, true, 0) => ("idle", "no requests yet"),
        (_, true, _) => ("ok", "healthy"),
    };
    let mut notes = Vec::new();
    if u.down {
        let next = u.next_probe_secs.map_or_else(String::new, |s| format!("; next try in {s} s"));
        notes.push(note("err", format!("skipped: {} failures in a row{next}", u.consecutive_failures)));
    } else if u.consecutive_failures > 0 {
        notes.push(note("note", format!("{} failures in a row", u.consecutive_failures)));
    }
    if let (Some(e), Some(t)) = (&u.last_error, u.last_error_secs_ago) {
        // An old error on a healthy upstream is history, not a warning.
        notes.push(note(if u.healthy { "note" } else { "err" }, format!("{}: {e}", ago(t))));
    }
    let latency = match (u.latency_ms, u.latency_p95_ms) {
        (Some(a), Some(b)) => format!("{} / {}", millis(a), millis(b)),
        _ => "–".to_string(),
    };
    let lookups = if u.lookups_last_hour == 0 {
        "no lookups in the last hour".to_string()
    } else {
        plural(u.lookups_last_hour, "lookup", "lookups")
    };
    template::render(
        UPSTREAM_ROW,
        &[
            ("url", u.url.as_str().into()),
            ("dot", dot.into()),
            ("word", word.into()),
            ("notes", Html::join(notes).into()),
            ("latency", latency.into()),
            ("lookups", lookups.into()),
            ("throughput", u.throughput.map_or_else(|| "–".to_string(), |b| format!("{}/s", bytes(b as u64))).into()),
            ("requests", count(u.requests).into()),
            ("errors", count(u.errors).into()),
            ("fetched", bytes(u.bytes_fetched).into()),
            ("last_ok", u.last_ok_secs_ago.map_or_else(|| "never".to_string(), ago).into()),
        ],
    )
}

fn misses(snap: &Snapshot) -> Html {
    if snap.recent_misses.is_empty() {
        return empty("None since ncps started.");
    }
    let rows = Html::join(snap.recent_misses.iter().map(miss_row));
    template::render(MISSES, &[("rows", rows.into())])
}

/// A store path base name, `<32 nix32 characters>-<name>`, split into its hash and its name.
fn split_store_name(what: &str) -> Option<(&str, &str)> {
    let (hash, name) = what.split_at_checked(32)?;
    (hash.bytes().all(crate::nix::nix32::is_nix32_char) && name.starts_with('-') && name.len() > 1).then_some((hash, name))
}

fn miss_row(m: &RecentMiss) -> Html {
    // The name says what it is; the start of the hash is enough to tell two versions apart.
    let (hash, name) = match split_store_name(&m.what) {
        Some((hash, name)) => (format!("{}…", &hash[..8]), name),
        None => (String::new(), m.what.as_str()),
    };
    let note_text = match m.state {
        MissState::Fetched => None,
        MissState::Narinfo => Some(("note", "narinfo fetched; its NAR not asked for yet")),
        MissState::Failed => Some(("err", "NAR download failed")),
        MissState::NotFound => Some(("note", "found on no upstream")),
        MissState::Unavailable => Some(("err", "no upstream answered")),
    };
    let took = m.took_ms.map_or_else(|| "–".to_string(), millis);
    template::render(
        MISS_ROW,
        &[
            ("full", m.what.as_str().into()),
            ("hash", hash.into()),
            ("name", name.into()),
            ("note", note_text.map_or_else(Html::default, |(c, t)| note(c, t.to_string())).into()),
            ("size", m.size.map_or_else(|| "–".to_string(), bytes).into()),
            ("took", took.into()),
            ("upstream", m.upstream.as_deref().unwrap_or("–").into()),
            ("when", ago(m.secs_ago).into()),
        ],
    )
}

/// `0.8 ms`, `12 ms`, `1.4 s`.
fn millis(ms: f64) -> String {
    match ms {
        ms if ms < 10.0 => format!("{ms:.1} ms"),
        ms if ms < 1000.0 => format!("{ms:.0} ms"),
        ms => format!("{:.1} s", ms / 1000.0),
    }
}

/// The same figures as JSON, with `hostname` and `publicKey` as Go ncps answers.
pub fn render_json(s: &StatusInput) -> String {
    let snap = s.snapshot;
    let mut j = String::with_capacity(2048);
    let _ = write!(
        j,
        "{{\"hostname\":{},\"publicKey\":{},\"substituter\":{},\"nixConf\":{},\"uptimeSeconds\":{},",
        json_str(s.hostname),
        json_str(s.public_key),
        json_str(&substituter_url(s)),
        json_str(&nix_conf(s)),
        snap.uptime_secs
    );
    let _ = write!(
        j,
        "\"hitRatio\":{},\"bytesServedFromCache\":{},\"bytesServedWhileFetching\":{},\"bytesFetched\":{},",
        json_num(snap.hit_ratio()),
        snap.bytes_from_cache(),
        snap.narinfo.bytes_miss + snap.nar.bytes_miss,
        snap.bytes_fetched()
    );
    for (name, k) in [("narinfo", &snap.narinfo), ("nar", &snap.nar)] {
        let _ = write!(
            j,
            "\"{name}\":{{\"hits\":{},\"misses\":{},\"notFound\":{},\"errors\":{},\"hitRatio\":{}}},",
            k.hits,
            k.misses,
            k.not_found,
            k.errors,
            json_num(k.hit_ratio())
        );
    }
    let st = s.store;
    let _ = write!(
        j,
        "\"store\":{{\"sizeBytes\":{},\"maxSizeBytes\":{},\"narCount\":{},\"narinfoCount\":{}}},",
        st.size_bytes,
        st.max_size.map_or_else(|| "null".to_string(), |m| m.to_string()),
        st.nar_count,
        st.narinfo_count
    );
    let _ = write!(
        j,
        "\"downloadsInFlight\":{},\"evicted\":{{\"narinfos\":{},\"nars\":{},\"bytes\":{}}},\"upstreams\":[",
        snap.downloads_in_flight, snap.evicted_narinfos, snap.evicted_nars, snap.evicted_bytes
    );
    for (i, u) in snap.upstreams.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        let _ = write!(
            j,
            "{{\"url\":{},\"healthy\":{},\"state\":\"{}\",\"consecutiveFailures\":{},\"nextProbeInSeconds\":{},\"requests\":{},\"errors\":{},\"bytesFetched\":{},\"latencyMs\":{},\"latencyP95Ms\":{},\
             \"lookupsLastHour\":{},\"throughputBytesPerSecond\":{},\"lastOkSecondsAgo\":{},\"lastError\":{},\"lastErrorSecondsAgo\":{}}}",
            json_str(&u.url),
            u.healthy,
            if u.down { "down" } else { "up" },
            u.consecutive_failures,
            json_opt(u.next_probe_secs),
            u.requests,
            u.errors,
            u.bytes_fetched,
            json_num(u.latency_ms.map(|ms| (ms * 10.0).round() / 10.0)),
            json_num(u.latency_p95_ms.map(|ms| (ms * 10.0).round() / 10.0)),
            u.lookups_last_hour,
            json_num(u.throughput.map(f64::round)),
            json_opt(u.last_ok_secs_ago),
            u.last_error.as_deref().map_or_else(|| "null".to_string(), json_str),
            json_opt(u.last_error_secs_ago)
        );
    }
    j.push_str("],\"recentMisses\":[");
    for (i, m) in snap.recent_misses.iter().enumerate() {
        if i > 0 {
            j.push(',');
        }
        let _ = write!(
            j,
            "{{\"what\":{},\"state\":{},\"sizeBytes\":{},\"tookMs\":{},\"upstream\":{},\"secondsAgo\":{}}}",
            json_str(&m.what),
            json_str(m.state.label()),
            json_opt(m.size),
            json_num(m.took_ms.map(|ms| (ms * 10.0).round() / 10.0)),
            m.upstream.as_deref().map_or_else(|| "null".to_string(), json_str),
            m.secs_ago
        );
    }
    let mut day = Totals::default();
    for c in &snap.history {
        day.add(c);
    }
    let _ = writeln!(
        j,
        "],\"last24Hours\":{{\"hits\":{},\"misses\":{},\"hitRatio\":{},\"bytesServedFromCache\":{},\"bytesFetched\":{},\
         \"lookups\":{},\"latencyP50Ms\":{},\"latencyP95Ms\":{}}}}}",
        day.hits,
        day.misses,
        json_num(day.hit_ratio()),
        day.bytes_cache,
        day.bytes_fetched,
        day.latency.count(),
        json_num(day.latency.quantile_ms(0.5).map(|ms| (ms * 10.0).round() / 10.0)),
        json_num(day.latency.quantile_ms(0.95).map(|ms| (ms * 10.0).round() / 10.0)),
    );
    j
}

/// A JSON string literal. `<`, `>` and `&` are escaped too, so the text stays inert if some
/// client ever treats the answer as HTML.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}') => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number, or `null` when absent or not finite (JSON has no NaN).
fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{}", (v * 10_000.0).round() / 10_000.0),
        _ => "null".to_string(),
    }
}

fn json_opt(v: Option<u64>) -> String {
    v.map_or_else(|| "null".to_string(), |v| v.to_string())
}

fn percent(f: f64) -> String {
    let p = f * 100.0;
    // One decimal where it tells something (99.5% is not 100%).
    if p > 0.0 && p < 10.0 || p > 99.0 && p < 100.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// `1 hit`, `1,234 hits`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", count(n), if n == 1 { one } else { many })
}

/// `1234567` → `1,234,567`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Binary units, as `du -h` and Nix print them.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn ago(secs: u64) -> String {
    match secs {
        0..=4 => "just now".to_string(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Kind, Metrics, MissState, Outcome};
    use std::time::Duration;

    const KEY: &str = "cache.lan-1:Yh0kVb6Kd8mEo1yq7tKQ0gN3wYwZ0n9r2GvT6d0Xq1s=";

    fn hostile_snapshot() -> Snapshot {
        let m = Metrics::new(&["https://cache.nixos.org".into(), "http://<script>alert(1)</script>\"'&/".into()]);
        m.served(Kind::Narinfo, Outcome::Hit, 200, 1000);
        m.served(Kind::Narinfo, Outcome::Miss, 200, 1000);
        m.upstream_request(1, Kind::Narinfo, Duration::from_millis(5), false);
        m.upstream_error_detail(1, "<img src=x onerror=alert(1)> \"quoted\" \\ back");
        m.recent_miss("<script>alert('miss')</script>", MissState::NotFound);
        m.recent_miss("abc\"def\u{2028}", MissState::Unavailable);
        m.snapshot()
    }

    fn input<'a>(snap: &'a Snapshot, store: &'a StoreStats, host: Option<&'a str>) -> StatusInput<'a> {
        StatusInput { hostname: "cache.lan", public_key: KEY, host_header: host, snapshot: snap, store }
    }

    #[test]
    fn html_escapes_everything_that_came_from_outside() {
        let snap = hostile_snapshot();
        let store = StoreStats { size_bytes: 10, nar_count: 1, narinfo_count: 1, max_size: Some(100) };
        let html = render_html(&input(&snap, &store, Some("<b>evil</b>:80")));
        assert!(!html.contains("<script") && !html.contains("<img") && !html.contains("<b>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt; &quot;quoted&quot;"));
        // An implausible Host header falls back to the configured name.
        assert!(html.contains("substituters = http://cache.lan\n"), "{html}");
        assert!(html.contains(&format!("trusted-public-keys = {KEY}")));
        assert!(!html.to_ascii_lowercase().contains("<script") && !html.contains("src=\"http"));
    }

    #[test]
    fn an_empty_history_renders_flat_charts_and_every_placeholder_is_filled() {
        crate::template::take_missing();
        for (i, snap) in [Snapshot::default(), Metrics::new(&[]).snapshot(), hostile_snapshot()].iter().enumerate() {
            let html = render_html(&input(snap, &StoreStats::default(), None));
            assert_eq!(html.matches("<svg ").count(), 3, "{html}");
            assert!(!html.contains("{{"));
            if i < 2 {
                assert!(!html.contains("class=\"ratio\"") && !html.contains("class=\"p50\""), "no bars without traffic");
                assert!(html.contains("no requests") && html.contains("no traffic"));
            }
            check_json(&render_json(&input(snap, &StoreStats::default(), None)));
        }
        assert_eq!(crate::template::take_missing(), Vec::<String>::new());
    }

    #[test]
    fn history_is_drawn_as_bars_and_misses_by_store_path_name() {
        let m = Metrics::new(&["http://user:pw@up.lan:8080".into()]);
        m.served(Kind::Nar, Outcome::Hit, 200, 1 << 25);
        m.served(Kind::Nar, Outcome::Miss, 200, 1 << 26);
        m.upstream_bytes(0, 1 << 26);
        m.upstream_request(0, Kind::Nar, Duration::from_millis(500), true);
        m.narinfo_lookup(0, Duration::from_millis(3));
        m.narinfo_lookup(0, Duration::from_millis(30));
        let nar = "0kznl4zwfh8brk40bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.nar.xz";
        m.narinfo_fetched(0, "/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-fixture-big", nar, Some(1 << 26), Duration::from_millis(3));
        m.nar_fetched(nar, Some(0), 1 << 26, Duration::from_millis(597), true);
        m.narinfo_fetched(0, "/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-<img src=x onerror=alert(1)>", "n.nar", None, Duration::ZERO);
        let snap = m.snapshot();
        let html = render_html(&input(&snap, &StoreStats::default(), None));
        for class in ["traffic", "ratio", "cache", "fetched", "p95", "p50"] {
            let d = html.split(&format!("<path class=\"{class}\" d=\"M0 ")).nth(1).unwrap_or_else(|| panic!("{class}: {html}"));
            assert!(d.split('"').next().unwrap().starts_with("32.0H287V") || d.starts_with("64.0H287V"), "{class} bar in the newest column only: {d}");
        }
        assert!(html.contains("<span class=\"hash\">0mdqa9w1…</span><span class=\"name\">-fixture-big</span>"), "{html}");
        assert!(html.contains("<td class=\"num\">64 MiB</td><td class=\"num\">600 ms</td><td class=\"mono\">http://up.lan:8080</td>"), "{html}");
        assert!(html.contains("-&lt;img src=x onerror=alert(1)&gt;") && !html.contains("<img"), "a store path name is text");
        assert!(html.contains("128 MiB/s"), "throughput: 64 MiB in 0.5 s: {html}");
        assert!(html.contains("50%"));
        let json = render_json(&input(&snap, &StoreStats::default(), None));
        assert!(json.contains(r#""what":"0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-fixture-big","state":"fetched","sizeBytes":67108864,"tookMs":600,"upstream":"http://up.lan:8080""#), "{json}");
        assert!(json.contains(r#""throughputBytesPerSecond":134217728"#) && json.contains(r#""lookups":2,"#), "{json}");
        check_json(&json);
    }

    #[test]
    fn a_full_day_of_traffic_keeps_the_page_under_64_kib() {
        // Every column busy, every bar drawn, 20 misses with the longest names kept.
        let h = crate::history::History::new();
        for minute in 0..crate::history::MINUTES as u64 {
            h.served(minute, minute % 3 != 0, 123_456_789);
            h.fetched(minute, 98_765_432);
            h.lookup(minute, (minute % 700) as f64 + 0.3);
            h.lookup(minute, 9_000.0);
        }
        let m = Metrics::new(&["http://a.example".into(), "http://b.example".into()]);
        for i in 0..40 {
            m.narinfo_fetched(0, &format!("/nix/store/{i:0>32}-{}", "n".repeat(180)), "x.nar", Some(1 << 30), Duration::from_secs(3));
        }
        let mut snap = m.snapshot();
        snap.history = h.columns(crate::history::MINUTES as u64 - 1, crate::metrics::HISTORY_COLUMNS);
        let html = render_html(&input(&snap, &StoreStats::default(), None));
        assert_eq!(html.matches("<path class=\"ratio\"").count(), 1, "one path per series");
        assert!(html.len() < 64 * 1024, "{} bytes", html.len());
        eprintln!("a full day: {} bytes", html.len());
    }

    #[test]
    fn nix_conf_uses_the_host_header() {
        let snap = Snapshot::default();
        let store = StoreStats::default();
        let html = render_html(&input(&snap, &store, Some("10.0.0.5:8501")));
        assert!(html.contains("substituters = http://10.0.0.5:8501\ntrusted-public-keys = "));
        let html = render_html(&input(&snap, &store, Some("[fe80::1]:8501")));
        assert!(html.contains("substituters = http://[fe80::1]:8501\n"));
    }

    #[test]
    fn json_has_ncps_fields_and_escapes_strings() {
        let snap = hostile_snapshot();
        let store = StoreStats { size_bytes: 10, nar_count: 1, narinfo_count: 2, max_size: None };
        let json = render_json(&input(&snap, &store, Some("cache.lan:8501")));
        assert!(json.starts_with("{\"hostname\":\"cache.lan\",\"publicKey\":\""), "{json}");
        assert!(json.contains("\"maxSizeBytes\":null") && json.contains("\"hitRatio\":0.5"));
        assert!(json.contains(r#"\u003cscript\u003ealert('miss')\u003c/script\u003e"#), "{json}");
        assert!(json.contains(r#"abc\"def\u2028"#));
        assert!(json.contains(r#"\"quoted\" \\ back"#));
        assert!(json.contains(r#""substituter":"http://cache.lan:8501""#));
        assert!(!json.contains('<') && !json.contains('\u{2028}'));
        check_json(&json);
    }

    #[test]
    fn an_upstream_marked_down_is_shown_down_with_its_failures_in_html_and_json() {
        let m = Metrics::new(&["https://cache.nixos.org".into(), "http://mirror.lan".into()]);
        m.upstream_health(1, true, 3, Some(Duration::from_secs(2)));
        let snap = m.snapshot();
        let store = StoreStats::default();
        let html = render_html(&input(&snap, &store, None));
        assert!(html.contains("1 of 2 upstreams failing"), "{html}");
        assert!(html.contains("down</td>") || html.contains(">down<"), "{html}");
        assert!(html.contains("skipped: 3 failures in a row; next try in 2 s"), "{html}");
        let json = render_json(&input(&snap, &store, None));
        assert!(json.contains(r#""url":"http://mirror.lan","healthy":false,"state":"down","consecutiveFailures":3,"nextProbeInSeconds":2"#), "{json}");
        assert!(json.contains(r#""state":"up","consecutiveFailures":0,"nextProbeInSeconds":null"#), "{json}");
        check_json(&json);
    }

    /// Checks that `s` is one well-formed JSON value (a strict little recursive descent).
    fn check_json(s: &str) {
        fn value(b: &[u8], i: &mut usize) {
            match b[*i] {
                b'{' => {
                    *i += 1;
                    if b[*i] == b'}' {
                        *i += 1;
                        return;
                    }
                    loop {
                        string(b, i);
                        assert_eq!(b[*i], b':');
                        *i += 1;
                        value(b, i);
                        match b[*i] {
                            b',' => *i += 1,
                            b'}' => break *i += 1,
                            c => panic!("unexpected {} at {i}", c as char),
                        }
                    }
                }
                b'[' => {
                    *i += 1;
                    if b[*i] == b']' {
                        *i += 1;
                        return;
                    }
                    loop {
                        value(b, i);
                        match b[*i] {
                            b',' => *i += 1,
                            b']' => break *i += 1,
                            c => panic!("unexpected {} at {i}", c as char),
                        }
                    }
                }
                b'"' => string(b, i),
                _ => {
                    let start = *i;
                    while *i < b.len() && !matches!(b[*i], b',' | b'}' | b']') {
                        *i += 1;
                    }
                    let lit = std::str::from_utf8(&b[start..*i]).unwrap();
                    assert!(matches!(lit, "true" | "false" | "null") || lit.parse::<f64>().is_ok(), "{lit:?}");
                }
            }
        }
        fn string(b: &[u8], i: &mut usize) {
            assert_eq!(b[*i], b'"');
            *i += 1;
            loop {
                match b[*i] {
                    b'"' => break *i += 1,
                    b'\\' => {
                        *i += 1;
                        if b[*i] == b'u' {
                            assert!(b[*i + 1..*i + 5].iter().all(u8::is_ascii_hexdigit));
                            *i += 4;
                        } else {
                            assert!(b"\"\\/bfnrt".contains(&b[*i]));
                        }
                        *i += 1;
                    }
                    c => {
                        assert!(c >= 0x20, "raw control character");
                        *i += 1;
                    }
                }
            }
        }
        let b = s.trim_end().as_bytes();
        let mut i = 0;
        value(b, &mut i);
        assert_eq!(i, b.len(), "trailing data");
    }

    #[test]
    fn accept_header_decides_the_format() {
        assert!(wants_html(Some("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")));
        assert!(wants_html(Some("TEXT/HTML")));
        assert!(!wants_html(Some("*/*")));
        assert!(!wants_html(Some("application/json")));
        assert!(!wants_html(Some("text/html;q=0, application/json")));
        assert!(!wants_html(None));
    }

    #[test]
    fn figures_read_naturally() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 * 1024 * 1024 * 1024), "20 GiB");
        assert_eq!(percent(0.5), "50%");
        assert_eq!(percent(0.995), "99.5%");
        assert_eq!(ago(90), "1 min ago");
        assert_eq!(duration(90_000), "1 d 1 h");
    }
}
