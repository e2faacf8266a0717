//! The HTTP front: which request goes where. Routing only; the work is in [`crate::cache`].
//!
//! Paths are matched strictly, against the exact shapes Nix asks for. Anything else (encoded
//! characters, dot segments, wrong hash lengths or alphabets, unknown extensions) is refused
//! with a 4xx before it reaches code that builds file names.

use crate::auth::{authorizes, Secret};
use crate::cache::{Answer, Cache};
use crate::metrics::{Kind, MissState, Outcome};
use crate::status;
use crate::http::{Body, Handler, Lane, Method, Request, Response};
use crate::nix::{Hash, NarName, StorePathHash};
use std::io::Read;
use std::sync::Arc;

pub const NIX_CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";

/// What the routes are told by the configuration (built in `serve::prepare`).
#[derive(Debug, Clone)]
pub struct RouteSettings {
    pub hostname: String,
    pub allow_put: bool,
    pub allow_delete: bool,
    pub prometheus: bool,
    /// `--cache-get-token`: what every read but `/healthz` and `/metrics` must present.
    pub get_token: Option<Secret>,
    /// `--cache-write-token`: what PUT and DELETE must present (reads may present it too).
    pub write_token: Option<Secret>,
}

pub struct Routes {
    cache: Arc<Cache>,
    hostname: String,
    pubkey: String,
    allow_put: bool,
    allow_delete: bool,
    prometheus: bool,
    get_token: Option<Secret>,
    write_token: Option<Secret>,
}

impl Routes {
    pub fn new(cache: Arc<Cache>, settings: RouteSettings) -> Routes {
        let pubkey = cache.public_key().to_string();
        let RouteSettings { hostname, allow_put, allow_delete, prometheus, get_token, write_token } = settings;
        Routes { cache, hostname, pubkey, allow_put, allow_delete, prometheus, get_token, write_token }
    }
}

/// What a request path asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Root,
    NixCacheInfo,
    PubKey,
    Healthz,
    Metrics,
    Narinfo(StorePathHash),
    Nar(NarName),
    /// A path Nix may ask for that ncps does not serve (`.ls`, `log/`, `realisations/`...).
    NotFound,
    /// A path no client should send; the reason goes to the log.
    Bad(&'static str),
}

impl Route {
    /// The route as a template, for telemetry (`/nar/{name}`): low-cardinality span names.
    pub fn template(&self, upload: bool) -> &'static str {
        match (self, upload) {
            (Route::Root, _) => "/",
            (Route::NixCacheInfo, _) => "/nix-cache-info",
            (Route::PubKey, _) => "/pubkey",
            (Route::Healthz, _) => "/healthz",
            (Route::Metrics, _) => "/metrics",
            (Route::Narinfo(_), false) => "/{hash}.narinfo",
            (Route::Narinfo(_), true) => "/upload/{hash}.narinfo",
            (Route::Nar(_), false) => "/nar/{name}",
            (Route::Nar(_), true) => "/upload/nar/{name}",
            (Route::NotFound, _) => "(not found)",
            (Route::Bad(_), _) => "(refused)",
        }
    }
}

/// Splits off the `/upload` prefix of today's ncps (`nix copy --to http://HOST/upload`):
/// returns the path below it and whether it was there.
pub fn strip_upload(path: &str) -> (&str, bool) {
    match path.strip_prefix("/upload") {
        Some(rest) if rest.starts_with('/') => (rest, true),
        Some("") => ("/", true),
        _ => (path, false),
    }
}

/// Classifies a request path (without its query).
///
/// ```
/// use ncps::routes::{route, Route};
/// assert_eq!(route("/nix-cache-info"), Route::NixCacheInfo);
/// assert!(matches!(route("/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr.narinfo"), Route::Narinfo(_)));
/// assert!(matches!(route("/nar/..%2f..%2fetc%2fpasswd"), Route::Bad(_)));
/// ```
pub fn route(path: &str) -> Route {
    if !path.starts_with('/') {
        return Route::Bad("path does not start with /");
    }
    if path.contains('%') {
        // No valid cache path needs percent-encoding; decoding would only open a way round
        // the checks below.
        return Route::Bad("percent-encoded path");
    }
    if path.split('/').any(|seg| seg == ".." || seg == ".") || path.contains("//") || path.contains('\\') {
        return Route::Bad("dot segment or empty segment in path");
    }
    match path {
        "/" => return Route::Root,
        "/nix-cache-info" => return Route::NixCacheInfo,
        "/pubkey" => return Route::PubKey,
        "/healthz" => return Route::Healthz,
        "/metrics" => return Route::Metrics,
        _ => {}
    }
    if let Some(file) = path.strip_prefix("/nar/") {
        return match NarName::parse(file) {
            Some(n) => Route::Nar(n),
            None if file.contains(".nar") => Route::Bad("malformed NAR name or unknown extension"),
            None => Route::NotFound,
        };
    }
    if let Some(hash) = path.strip_prefix('/').and_then(|p| p.strip_suffix(".narinfo")) {
        return match StorePathHash::parse(hash) {
            Some(h) => Route::Narinfo(h),
            None => Route::Bad("malformed narinfo hash"),
        };
    }
    Route::NotFound
}

/// A NAR answer (a hit, a download in progress, or a HEAD before one) may be asked for in
/// parts, with its FileHash as strong ETag (`"<nix32>"`): see [`crate::http::range`].
fn nar_ranges(resp: Response, file_hash: Option<Hash>) -> Response {
    if resp.status != 200 {
        return resp;
    }
    resp.with_ranges(file_hash.map(|h| format!("\"{}\"", h.to_nix32())))
}

fn method_not_allowed(allow: &str) -> Response {
    Response::text(405, "Method Not Allowed\n").with_header("Allow", allow.to_string())
}

impl Handler for Routes {
    fn handle(&self, req: &Request, body: &mut dyn Read) -> Response {
        let (path, upload) = strip_upload(req.path());
        let r = route(path);
        crate::otel::route(&req.method_text, r.template(upload));
        if let Some(refused) = self.refuse_unauthorized(&r, req) {
            return refused;
        }
        match (&r, req.method) {
            (Route::Bad(why), _) => {
                log::info!("{} {} {}: refused: {why}", req.peer.ip(), req.method_text, req.target);
                Response::text(400, format!("Bad Request: {why}\n"))
            }
            (Route::NotFound, _) => Response::not_found(),
            (Route::Narinfo(_) | Route::Nar(_), Method::Put) => self.put(&r, req, body),
            (Route::Narinfo(_) | Route::Nar(_), Method::Delete) if !upload => self.delete(&r, req),
            (Route::Narinfo(_) | Route::Nar(_), _) if !matches!(req.method, Method::Get | Method::Head) => {
                method_not_allowed(&self.allowed(upload))
            }
            (_, Method::Get | Method::Head) => self.read(r, req, upload),
            _ => method_not_allowed("GET, HEAD"),
        }
    }

    fn fast(&self, req: &Request) -> Option<Response> {
        self.fast_answer(req)
    }

    /// Misses go to the upstream pool: a narinfo or NAR read (not under `/upload`, which
    /// never asks upstream) for something the store does not hold.
    fn lane(&self, req: &Request) -> Lane {
        if !matches!(req.method, Method::Get | Method::Head) {
            return Lane::Local;
        }
        let (path, upload) = strip_upload(req.path());
        match route(path) {
            Route::Narinfo(hash) if !upload && !self.cache.holds_narinfo_now(&hash) => Lane::Upstream,
            Route::Nar(name) if !self.cache.holds_nar_now(&name) => Lane::Upstream,
            _ => Lane::Local,
        }
    }
}

impl Routes {
    /// Requests the poll loop can answer itself: small, fixed answers and narinfo hits.
    fn fast_answer(&self, req: &Request) -> Option<Response> {
        if !matches!(req.method, Method::Get | Method::Head) {
            return None;
        }
        let (path, upload) = strip_upload(req.path());
        let r = route(path);
        crate::otel::route(&req.method_text, r.template(upload));
        if let Some(refused) = self.refuse_unauthorized(&r, req) {
            return Some(refused);
        }
        match r {
            r @ (Route::NixCacheInfo | Route::PubKey) => Some(self.read(r, req, upload)),
            Route::Narinfo(hash) => match self.cache.narinfo_hit_fast(&hash) {
                Ok(Some(body)) => Some(self.answer(Ok(Answer::Hit(body)), Kind::Narinfo, req)),
                _ => None,
            },
            // Small NAR hits too (many NARs are a few KiB): with 200 busy connections, a hand-off
            // to a worker per request was most of their latency (DESIGN.md, "Isolation"). Not
            // a Range request: parts are the workers' job.
            Route::Nar(name) if req.header("range").is_none() => {
                match self.cache.small_nar_hit(&name, crate::http::FAST_FILE_MAX) {
                    Ok(Some((body, tag))) => Some(nar_ranges(self.answer(Ok(Answer::Hit(body)), Kind::Nar, req), tag)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// A 401 when the request lacks the token it needs: PUT and DELETE the write token (when
    /// one is set), every read but `/healthz` and `/metrics` the read token or the write one.
    fn refuse_unauthorized(&self, r: &Route, req: &Request) -> Option<Response> {
        let header = req.header("authorization");
        let needed: Vec<&Secret> = match req.method {
            Method::Put | Method::Delete => self.write_token.iter().collect(),
            _ if matches!(r, Route::Healthz | Route::Metrics) => Vec::new(),
            _ => match &self.get_token {
                Some(g) => std::iter::once(g).chain(&self.write_token).collect(),
                None => Vec::new(),
            },
        };
        if needed.is_empty() || authorizes(header, &needed) {
            return None;
        }
        let why = if header.is_some() { "the token presented is not accepted" } else { "no token presented" };
        log::info!("{} {} {}: refused: {why}", req.peer.ip(), req.method_text, req.target);
        let host = req.header("host").unwrap_or(&self.hostname);
        let host = host.rsplit_once(':').filter(|(h, p)| !h.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
        let what = if matches!(req.method, Method::Put | Method::Delete) { "write to" } else { "read from" };
        Some(
            Response::text(
                401,
                format!(
                    "Unauthorized: {why}. To {what} this cache, Nix needs the token in a netrc file:\n\
                     \n  machine {host}\n  login nix\n  password <token>\n\n\
                     and `netrc-file = /etc/nix/netrc` (that file's path) in nix.conf; other clients \
                     send `Authorization: Bearer <token>`.\n"
                ),
            )
            .with_header("WWW-Authenticate", "Basic realm=\"ncps\"")
            .with_header("WWW-Authenticate", "Bearer realm=\"ncps\"")
            .with_note("unauthorized"),
        )
    }

    fn allowed(&self, upload: bool) -> String {
        let mut allow = String::from("GET, HEAD");
        if self.allow_put {
            allow.push_str(", PUT");
        }
        if self.allow_delete && !upload {
            allow.push_str(", DELETE");
        }
        allow
    }

    fn read(&self, r: Route, req: &Request, upload: bool) -> Response {
        match r {
            Route::Root => self.status(req),
            Route::Metrics if self.prometheus => match self.cache.figures() {
                Ok(store) => Response::new(
                    200,
                    crate::metrics::CONTENT_TYPE,
                    Body::Bytes(self.cache.metrics().render_prometheus(&store).into_bytes()),
                ),
                Err(e) => {
                    log::error!("metrics: {e}");
                    Response::text(500, "Internal Server Error\n")
                }
            },
            Route::Metrics => Response::not_found(),
            Route::NixCacheInfo => Response::new(200, "text/x-nix-cache-info", Body::Bytes(NIX_CACHE_INFO.into())),
            Route::PubKey => Response::text(200, format!("{}\n", self.pubkey)),
            Route::Healthz => match self.cache.health() {
                Ok(()) => Response::text(200, "ok\n"),
                Err(e) => {
                    log::error!("health check: {e}");
                    Response::text(503, format!("unhealthy: {e}\n"))
                }
            },
            // Under /upload, a client is checking what it needs to send: only what is here counts.
            Route::Narinfo(hash) if upload => self.answer(self.cache.narinfo_local(&hash), Kind::Narinfo, req),
            Route::Narinfo(hash) => self.answer(self.cache.narinfo(&hash, &crate::http::client_gone), Kind::Narinfo, req),
            Route::Nar(name) => {
                // zstd only for a whole body: a range is of the plain bytes.
                let zstd = req.header("Range").is_none() && crate::http::accepts_zstd(req.header("Accept-Encoding"));
                let (answer, file_hash) = match self.cache.nar(&name, req.method == Method::Head, req.peer.ip(), zstd) {
                    Ok((answer, file_hash)) => (Ok(answer), file_hash),
                    Err(e) => (Err(e), None),
                };
                let resp = nar_ranges(self.answer(answer, Kind::Nar, req), file_hash);
                if self.cache.zstd_responses() && crate::cache::zstd_copies::is_plain(&name) {
                    // The body depends on Accept-Encoding: caches in between must know.
                    resp.with_header("Vary", "Accept-Encoding")
                } else {
                    resp
                }
            }
            Route::NotFound | Route::Bad(_) => Response::not_found(),
        }
    }

    /// `GET /`: a page for people (Accept: text/html), JSON for everything else.
    fn status(&self, req: &Request) -> Response {
        let store = match self.cache.figures() {
            Ok(f) => f,
            Err(e) => {
                log::error!("status page: {e}");
                return Response::text(500, "Internal Server Error\n");
            }
        };
        let snapshot = self.cache.metrics().snapshot();
        let input = status::StatusInput {
            hostname: &self.hostname,
            public_key: &self.pubkey,
            host_header: req.header("host"),
            snapshot: &snapshot,
            store: &store,
        };
        if status::wants_html(req.header("accept")) {
            Response::new(200, status::HTML_CONTENT_TYPE, Body::Bytes(status::render_html(&input).into_bytes()))
                .with_header("Content-Security-Policy", status::CONTENT_SECURITY_POLICY)
        } else {
            Response::new(200, status::JSON_CONTENT_TYPE, Body::Bytes(status::render_json(&input).into_bytes()))
        }
    }

    /// Turns a cache answer into a response, counting it.
    fn answer(&self, result: Result<Answer, crate::cache::CacheError>, kind: Kind, req: &Request) -> Response {
        let content_type = match kind {
            Kind::Narinfo => "text/x-nix-narinfo",
            Kind::Nar => "application/x-nix-nar",
        };
        // A lookup no upstream could answer is still a miss a person wants to see on the page.
        let upstreams_failed = matches!(result, Ok(Answer::Unavailable { .. }));
        let (outcome, resp) = match result {
            Ok(Answer::Hit(body)) => (Outcome::Hit, Response::new(200, content_type, body).with_note("hit")),
            Ok(Answer::HitZstd(body)) => (
                Outcome::Hit,
                Response::new(200, content_type, body).with_header("Content-Encoding", "zstd").with_note("hit (zstd)"),
            ),
            Ok(Answer::Redirect(url)) => (
                Outcome::Hit,
                Response::text(307, "Temporary Redirect\n").with_header("Location", url).with_note("hit (redirect)"),
            ),
            Ok(Answer::Miss(body, from)) => {
                (Outcome::Miss, Response::new(200, content_type, body).with_note("miss").with_upstream(from))
            }
            Ok(Answer::Length(n)) => {
                (Outcome::Miss, Response::new(200, content_type, Body::Declared(n)).with_note("miss"))
            }
            Ok(Answer::NotFound) => (Outcome::NotFound, Response::not_found().with_note("absent")),
            Ok(Answer::Busy) => (
                Outcome::Error,
                Response::text(503, "Service Unavailable: too many downloads at once\n")
                    .with_header("Retry-After", "2")
                    .with_note("busy"),
            ),
            // Not a 404: Nix would remember that as "absent" for an hour; a 5xx it retries and
            // then moves on to its next substituter, remembering nothing.
            Ok(Answer::Unavailable { status, reason }) => (
                Outcome::Error,
                Response::text(status, format!("{}: {reason}\n", crate::http::reason(status)))
                    .with_note("upstreams unavailable"),
            ),
            Err(e) => {
                log::error!("{} {}: {e}", req.method_text, req.target);
                (Outcome::Error, Response::text(500, "Internal Server Error\n").with_note("error"))
            }
        };
        let metrics = self.cache.metrics();
        let mut resp = resp;
        if matches!(resp.body, Body::Growing(_)) || kind == Kind::Nar {
            // Counted once sent: a download that fails before its first byte is a 502, and a
            // NAR may go out as a 206 part or a 416.
            let metrics = metrics.clone();
            resp.on_sent = Some(Box::new(move |sent| {
                let outcome = if sent.replaced_because.is_some() { Outcome::Error } else { outcome };
                metrics.served(kind, outcome, sent.status, sent.bytes);
            }));
        } else {
            let bytes = if req.method == Method::Head { 0 } else { resp.body.len() };
            metrics.served(kind, outcome, resp.status, bytes);
        }
        // Misses an upstream served are listed by the cache, under their store path's name.
        if outcome == Outcome::NotFound {
            metrics.recent_miss(req.path(), MissState::NotFound);
        } else if upstreams_failed {
            metrics.recent_miss(req.path(), MissState::Unavailable);
        }
        resp
    }

    fn put(&self, r: &Route, req: &Request, body: &mut dyn Read) -> Response {
        if !self.allow_put {
            return method_not_allowed(&self.allowed(false)).with_note("put disabled");
        }
        let result = match r {
            Route::Narinfo(hash) => self.cache.put_narinfo(hash, body),
            Route::Nar(name) => self.cache.put_nar(name, body, req.content_length),
            _ => return Response::not_found(),
        };
        match result {
            Ok(()) => Response::new(204, "text/plain", Body::Empty).with_note("stored"),
            Err(e) if e.status() == 500 => {
                log::error!("{} {}: {e}", req.method_text, req.target);
                Response::text(500, "Internal Server Error\n").with_note("error")
            }
            Err(e) => {
                log::info!("{} {} {}: refused: {e}", req.peer.ip(), req.method_text, req.target);
                let resp = Response::text(e.status(), format!("{e}\n"));
                if e.status() == 503 {
                    resp.with_header("Retry-After", "5")
                } else {
                    resp
                }
            }
        }
    }

    fn delete(&self, r: &Route, req: &Request) -> Response {
        if !self.allow_delete {
            return method_not_allowed(&self.allowed(false)).with_note("delete disabled");
        }
        let result = match r {
            Route::Narinfo(hash) => self.cache.delete_narinfo(hash),
            Route::Nar(name) => self.cache.delete_nar(name),
            _ => return Response::not_found(),
        };
        match result {
            Ok(true) => Response::new(204, "text/plain", Body::Empty).with_note("deleted"),
            Ok(false) => Response::not_found(),
            Err(e) => {
                log::error!("{} {}: {e}", req.method_text, req.target);
                Response::text(500, "Internal Server Error\n").with_note("error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused_before_any_lookup() {
        for p in [
            "/nar/../db.sqlite",
            "/nar/%2e%2e/db.sqlite",
            "/..%2fdb.sqlite",
            "//etc/passwd",
            "/nar/./x.nar",
            "relative",
            "/nar/0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73.nar.exe",
            "/0MDQA9W1P6CMLI6976V4WI0SW9R4P5PR.narinfo",
            "/0mdqa9w1p6cmli6976v4wi0sw9r4p5p.narinfo",
        ] {
            assert!(matches!(route(p), Route::Bad(_)), "{p} should be refused");
        }
    }

    #[test]
    fn paths_nix_asks_for_but_ncps_does_not_serve_are_plain_404s() {
        for p in ["/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr.ls", "/log/x.drv", "/realisations/x.doi", "/favicon.ico"] {
            assert_eq!(route(p), Route::NotFound, "{p}");
        }
    }

    #[test]
    fn nar_names_in_nix32_and_hex_are_routed() {
        assert!(matches!(route(&format!("/nar/{}.nar.zst", "a".repeat(64))), Route::Nar(_)));
        assert!(matches!(route(&format!("/nar/{}.nar", "0".repeat(52))), Route::Nar(_)));
    }
}
