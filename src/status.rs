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
//! like a host. Both formats are written by hand: the shapes are fixed and small, and a
//! template engine or JSON library would be most of the code.

use crate::metrics::{Snapshot, StoreStats, UpstreamStats};
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
    let mut h = String::with_capacity(16 * 1024);
    let host = esc(s.hostname);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>ncps · {host}</title><style>{CSS}</style></head><body><main>\n"
    );
    let failing = snap.upstreams.iter().filter(|u| !u.healthy).count();
    let (pill, health) = match (failing, snap.upstreams.len()) {
        (_, 0) => ("idle", "no upstreams".to_string()),
        (0, 1) => ("ok", "upstream healthy".to_string()),
        (0, _) => ("ok", "all upstreams healthy".to_string()),
        (f, n) => ("bad", format!("{f} of {n} upstreams failing")),
    };
    let _ = writeln!(
        h,
        "<header><h1>ncps <span class=\"host\">{host}</span></h1>\
         <p class=\"meta\"><span class=\"pill {pill}\">{health}</span> up {}</p></header>",
        duration(snap.uptime_secs)
    );

    // The headline figures.
    h.push_str("<section class=\"grid\">\n");
    let ratio = snap.hit_ratio().map_or_else(|| "–".to_string(), percent);
    let per_kind = |k: &crate::metrics::KindStats| k.hit_ratio().map_or_else(|| "–".to_string(), percent);
    card(
        &mut h,
        "Hit ratio",
        &ratio,
        &format!(
            "{} · {}<br>narinfo {} · NAR {}",
            plural(snap.narinfo.hits + snap.nar.hits, "hit", "hits"),
            plural(snap.narinfo.misses + snap.nar.misses, "miss", "misses"),
            per_kind(&snap.narinfo),
            per_kind(&snap.nar),
        ),
        None,
    );
    let fetched = snap.bytes_fetched();
    card(
        &mut h,
        "Served from cache",
        &bytes(snap.bytes_from_cache()),
        &format!(
            "upstream traffic saved<br>{} served while fetching",
            bytes(snap.narinfo.bytes_miss + snap.nar.bytes_miss)
        ),
        None,
    );
    card(
        &mut h,
        "Fetched from upstreams",
        &bytes(fetched),
        &format!(
            "{} in progress<br>{} · {}",
            plural(snap.downloads_in_flight, "download", "downloads"),
            plural(snap.narinfo.not_found + snap.nar.not_found, "path found nowhere", "paths found nowhere"),
            plural(snap.narinfo.errors + snap.nar.errors, "error", "errors"),
        ),
        None,
    );
    let st = s.store;
    let (limit, fill) = match st.max_size {
        Some(max) if max > 0 => {
            let f = st.size_bytes as f64 / max as f64;
            (format!("of {} ({})", bytes(max), percent(f)), Some(f))
        }
        _ => ("no size limit".to_string(), None),
    };
    card(
        &mut h,
        "Store",
        &bytes(st.size_bytes),
        &format!(
            "{limit}<br>{} · {}{}",
            plural(st.nar_count, "NAR", "NARs"),
            plural(st.narinfo_count, "narinfo", "narinfos"),
            evictions(snap)
        ),
        fill,
    );
    h.push_str("</section>\n");

    // How to use it.
    let _ = writeln!(
        h,
        "<section class=\"card\"><h2>Use this cache</h2>\
         <p class=\"sub\">Add to <code>/etc/nix/nix.conf</code> (or <code>nix.settings</code> on NixOS):</p>\
         <pre>{}</pre>\
         <p class=\"sub\">To add this cache to the ones you already use, write <code>extra-substituters</code> \
         and <code>extra-trusted-public-keys</code> instead. The key alone: <code>/pubkey</code>.</p></section>",
        esc(&nix_conf(s)),
    );

    // Upstreams.
    h.push_str("<section class=\"card\"><h2>Upstreams</h2>");
    if snap.upstreams.is_empty() {
        h.push_str("<p class=\"sub\">No upstream caches configured.</p>");
    } else {
        h.push_str(
            "<table><thead><tr><th>Upstream</th><th>Health</th><th class=\"num\">Latency</th>\
             <th class=\"num\">Requests</th><th class=\"num\">Errors</th><th class=\"num\">Fetched</th>\
             <th>Last success</th></tr></thead><tbody>",
        );
        for u in &snap.upstreams {
            upstream_row(&mut h, u);
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>\n");

    // Recent misses.
    h.push_str("<section class=\"card\"><h2>Recent misses</h2>");
    if snap.recent_misses.is_empty() {
        h.push_str("<p class=\"sub\">None since ncps started.</p>");
    } else {
        h.push_str("<table class=\"misses\"><tbody>");
        for m in &snap.recent_misses {
            let _ = write!(
                h,
                "<tr><td class=\"mono\">{}</td><td class=\"num when\">{}</td></tr>",
                esc(&m.what),
                ago(m.secs_ago)
            );
        }
        h.push_str("</tbody></table>");
    }
    h.push_str("</section>\n");

    let _ = write!(
        h,
        "<footer>The same figures as JSON: <code>curl {}/</code></footer>\n</main></body></html>\n",
        esc(&substituter_url(s)),
    );
    h
}

fn evictions(snap: &Snapshot) -> String {
    if snap.evicted_nars == 0 {
        return String::new();
    }
    format!("<br>evicted {} ({})", plural(snap.evicted_nars, "NAR", "NARs"), bytes(snap.evicted_bytes))
}

fn card(h: &mut String, title: &str, big: &str, sub: &str, fill: Option<f64>) {
    // `title`, `big` and `sub` are ncps's own text (numbers and fixed words), not input.
    let _ = write!(h, "<div class=\"card\"><h2>{title}</h2><div class=\"big\">{big}</div>");
    if let Some(f) = fill {
        let width = (f * 100.0).clamp(0.0, 100.0);
        let class = if f >= 0.95 { " full" } else { "" };
        let _ = write!(h, "<div class=\"bar{class}\"><span style=\"width:{width:.1}%\"></span></div>");
    }
    let _ = writeln!(h, "<p class=\"sub\">{sub}</p></div>");
}

fn upstream_row(h: &mut String, u: &UpstreamStats) {
    let (dot, word) = match (u.down, u.healthy, u.requests) {
        (true, _, _) => ("bad", "down"),
        (_, false, _) => ("bad", "failing"),
        (_, true, 0) => ("idle", "no requests yet"),
        (_, true, _) => ("ok", "healthy"),
    };
    let mut health = format!("<span class=\"dot {dot}\"></span>{word}");
    if u.down {
        let next = u.next_probe_secs.map_or_else(String::new, |s| format!("; next try in {s} s"));
        let _ = write!(health, "<div class=\"err\">skipped: {} failures in a row{next}</div>", u.consecutive_failures);
    } else if u.consecutive_failures > 0 {
        let _ = write!(health, "<div class=\"note\">{} failures in a row</div>", u.consecutive_failures);
    }
    if let (Some(e), Some(t)) = (&u.last_error, u.last_error_secs_ago) {
        // An old error on a healthy upstream is history, not a warning.
        let class = if u.healthy { "note" } else { "err" };
        let _ = write!(health, "<div class=\"{class}\">{}: {}</div>", ago(t), esc(e));
    }
    let latency = u.latency_ms.map_or_else(|| "–".to_string(), |ms| format!("{ms:.0} ms"));
    let last_ok = u.last_ok_secs_ago.map_or_else(|| "never".to_string(), ago);
    let _ = write!(
        h,
        "<tr><td class=\"mono\">{}</td><td>{health}</td><td class=\"num\">{latency}</td>\
         <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{last_ok}</td></tr>",
        esc(&u.url),
        count(u.requests),
        count(u.errors),
        bytes(u.bytes_fetched),
    );
}

const CSS: &str = "\
:root{--bg:#f4f5f7;--card:#fff;--fg:#1b2230;--muted:#6b7280;--line:#e3e6ea;--ok:#16a34a;--bad:#dc2626;--accent:#2563eb;--code:#f7f8fa}\
@media (prefers-color-scheme:dark){:root{--bg:#0f1216;--card:#171b21;--fg:#e5e7eb;--muted:#9aa3af;--line:#2a3039;--code:#11151a;--accent:#3b82f6}}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif}\
main{max-width:1120px;margin:0 auto;padding:26px 24px 36px}\
header{display:flex;flex-wrap:wrap;align-items:baseline;justify-content:space-between;gap:4px 16px;margin-bottom:18px}\
h1{font-size:22px;margin:0;font-weight:650}\
h1 .host{color:var(--muted);font-weight:400;margin-left:4px}\
.meta{margin:0;color:var(--muted)}\
.pill{display:inline-block;font-size:13px;font-weight:600;padding:2px 10px;border-radius:999px;margin-right:10px}\
.pill.ok{background:#dcfce7;color:#166534}.pill.bad{background:#fee2e2;color:#991b1b}.pill.idle{background:var(--line);color:var(--muted)}\
h2{font-size:12px;text-transform:uppercase;letter-spacing:.07em;color:var(--muted);margin:0 0 10px;font-weight:600}\
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:14px;margin-bottom:14px}\
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin-bottom:14px}\
.grid .card{margin:0}\
.big{font-size:30px;font-weight:650;line-height:1.15;font-variant-numeric:tabular-nums}\
.sub{color:var(--muted);font-size:13px;margin:8px 0 0}\
.bar{height:8px;background:var(--line);border-radius:4px;overflow:hidden;margin-top:10px}\
.bar>span{display:block;height:100%;background:var(--accent)}\
.bar.full>span{background:var(--bad)}\
pre{background:var(--code);border:1px solid var(--line);border-radius:8px;padding:12px 14px;margin:10px 0 0;overflow-x:auto;\
font:14px/1.6 ui-monospace,SFMono-Regular,Menlo,Consolas,'DejaVu Sans Mono',monospace;user-select:all}\
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,'DejaVu Sans Mono',monospace;font-size:13px}\
.key{word-break:break-all;color:var(--fg)}\
table{width:100%;border-collapse:collapse;font-size:14px}\
th{text-align:left;font-weight:600;color:var(--muted);font-size:12px;border-bottom:1px solid var(--line);padding:6px 10px 8px}\
td{border-bottom:1px solid var(--line);padding:9px 10px;vertical-align:top}\
tr:last-child td{border-bottom:0}\
th:first-child,td:first-child{padding-left:0}\
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
.mono{word-break:break-all}\
.when{color:var(--muted);width:9em}\
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:7px;vertical-align:baseline}\
.dot.ok{background:var(--ok)}.dot.bad{background:var(--bad)}.dot.idle{background:var(--muted)}\
.err{color:var(--bad);font-size:13px;margin-top:3px}\
.note{color:var(--muted);font-size:13px;margin-top:3px}\
footer{color:var(--muted);font-size:13px;margin-top:4px}\
";

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
            "{{\"url\":{},\"healthy\":{},\"state\":\"{}\",\"consecutiveFailures\":{},\"nextProbeInSeconds\":{},\"requests\":{},\"errors\":{},\"bytesFetched\":{},\"latencyMs\":{},\
             \"lastOkSecondsAgo\":{},\"lastError\":{},\"lastErrorSecondsAgo\":{}}}",
            json_str(&u.url),
            u.healthy,
            if u.down { "down" } else { "up" },
            u.consecutive_failures,
            json_opt(u.next_probe_secs),
            u.requests,
            u.errors,
            u.bytes_fetched,
            json_num(u.latency_ms.map(|ms| (ms * 10.0).round() / 10.0)),
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
        let _ = write!(j, "{{\"what\":{},\"secondsAgo\":{}}}", json_str(&m.what), m.secs_ago);
    }
    j.push_str("]}\n");
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

/// Escapes text for HTML element content and quoted attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
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
