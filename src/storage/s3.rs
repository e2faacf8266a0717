//! The S3 blob store (feature `s3`): narinfos and NARs as objects of one bucket, for a cache
//! whose NARs should live in an object store (AWS S3, MinIO, Garage, Ceph) rather than on the
//! machine ncps runs on. The index stays SQLite on local disk, and downloads are still staged in
//! a local temp file: [`BlobStore::put_nar`] receives the complete, verified file and uploads it.
//!
//! # Layout
//! `narinfo/<hash>.narinfo`, `nar/<name>` and `nar-zstd/<name>.zst`: flat keys, so that one
//! shard (the first two characters of the name) is one prefix listing (`ListObjectsV2` with
//! prefix `nar/<shard>`, a thousand keys a page).
//!
//! # How the contract holds
//! - **Atomic appearance**: an S3 object is visible only once its PUT (or its
//!   `CompleteMultipartUpload`) succeeded, whole. NARs above [`SINGLE_PUT_MAX`] go as a multipart
//!   upload, one part in memory at a time, aborted on any failure so that no part outlives it.
//! - **Crash safety**: a crash mid-upload leaves an incomplete multipart upload, invisible to
//!   every GET and listing (a bucket lifecycle rule `AbortIncompleteMultipartUpload` reclaims
//!   its space; ncps does not list uploads).
//! - **Idempotent removal**: DELETE of a missing key is a success in S3. Many keys go in
//!   `DeleteObjects` requests of up to [`DELETE_MANY_MAX`] keys (one round trip for a
//!   thousand objects, not one each); a store that does not take them (501, 405 or
//!   `NotImplemented`) gets one DELETE per key from then on.
//! - **The FileHash** travels as object metadata (`x-amz-meta-file-hash`), so a hit's ETag
//!   needs no index lookup.
//!
//! # Requests
//! Signed with `rusty-s3` (SigV4 presigned URLs: it only signs, with no HTTP client and no
//! async runtime of its own) and sent with the `ureq` client ncps already has, on the worker
//! thread that asked. A request that fails on the way (a connection error, a timeout, a 5xx or
//! a 429) is tried again after a growing pause, [`Retry`] times in all. The secret key is used
//! only to sign: it is never part of a URL, a header, an error or a log line.
//!
//! Hits are streams ([`Blob::Reader`]): the GET's body is relayed in chunks, and a range of it
//! is a ranged GET.

use super::{Blob, BlobStore, Listed, Shard, Staging, StorageError, Stray, TempFile};
use crate::nix::{Hash, NarName, StorePathHash};
use rusty_s3::actions::{
    AbortMultipartUpload, CompleteMultipartUpload, CreateMultipartUpload, DeleteObject, DeleteObjects, GetObject,
    HeadBucket, HeadObject, ListObjectsV2, ObjectIdentifier, PutObject, UploadPart,
};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;
use ureq::http;

/// NARs up to this size go in one PUT (read into memory whole); larger ones as a multipart
/// upload of parts this size (S3 wants at least 5 MiB a part, at most 10,000 parts).
pub const SINGLE_PUT_MAX: u64 = 16 << 20;

/// The most parts S3 takes in one upload.
const MAX_PARTS: u64 = 10_000;

/// How long a signed URL is valid. Each is used at once (and again on a retry), so this only
/// has to outlast the retries of one request.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);
/// How long a presigned URL handed to a client for a NAR hit works. The object store checks
/// it when the request starts, so a slow download outlives it; a client that retries asks
/// ncps again and gets a new one.
pub const REDIRECT_VALID: Duration = Duration::from_secs(10 * 60);

/// Narinfos are small; an object under `narinfo/` larger than this is not one of ours.
const NARINFO_MAX: u64 = 1 << 20;

/// The metadata header that carries a NAR's FileHash (`sha256:<nix32>`).
const FILE_HASH_HEADER: &str = "x-amz-meta-file-hash";

const NAR_PREFIX: &str = "nar/";
const NARINFO_PREFIX: &str = "narinfo/";
const ZSTD_PREFIX: &str = "nar-zstd/";
/// The object naming the one ncps that uses the bucket ([`S3Store::claim`]).
pub const OWNER_KEY: &str = "ncps-owner";

/// Where the store is and who ncps is there (from `--cache-storage-s3-*`).
#[derive(Clone)]
pub struct S3Settings {
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `http://endpoint/bucket/key` rather than `http://bucket.endpoint/key` (MinIO, Garage).
    pub force_path_style: bool,
    /// Hand out presigned URLs for NAR hits ([`BlobStore::nar_redirect`]).
    pub redirect: bool,
    pub retry: Retry,
}

impl S3Settings {
    /// The settings of `--cache-storage-s3-*` (what `serve` and `fsck` share).
    pub fn from_config(c: &crate::config::S3Config) -> S3Settings {
        S3Settings {
            endpoint: c.endpoint.clone(),
            bucket: c.bucket.clone(),
            region: c.region.clone(),
            access_key_id: c.access_key_id.clone(),
            secret_access_key: c.secret_access_key.expose().to_string(),
            force_path_style: c.force_path_style,
            redirect: c.redirect,
            retry: Retry::default(),
        }
    }
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("force_path_style", &self.force_path_style)
            .field("redirect", &self.redirect)
            .finish()
    }
}

/// How often a failed request is tried, and the pause before the first retry (doubled for
/// each one after it): 4 attempts from 200 ms take at most 1.4 s of pauses, enough to ride out
/// a restarting endpoint, short enough that a hit never waits long for a store that is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub first_pause: Duration,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry { attempts: 4, first_pause: Duration::from_millis(200) }
    }
}

/// Why a request to the object store failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum S3Error {
    /// The store answered with a status other than the one expected, and the S3 error code it
    /// gave (`AccessDenied`, `NoSuchBucket`, ...), if any.
    Status { status: u16, code: Option<String> },
    /// Connecting, sending or receiving failed (after the retries).
    Transport(Box<ureq::Error>),
    /// Reading the answer's body failed.
    Read(io::Error),
    /// The answer was not what S3 sends.
    Answer(String),
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Error::Status { status, code: Some(code) } => write!(f, "HTTP {status} ({code})"),
            S3Error::Status { status, code: None } => write!(f, "HTTP {status}"),
            S3Error::Transport(e) => write!(f, "{e}"),
            S3Error::Read(e) => write!(f, "reading the answer: {e}"),
            S3Error::Answer(why) => write!(f, "unexpected answer: {why}"),
        }
    }
}

impl S3Error {
    /// Whether the same request may succeed later: what [`Inner::send`] tries again (a
    /// connection error, a timeout, a 5xx, a 429), and a body cut short.
    pub fn is_transient(&self) -> bool {
        match self {
            S3Error::Status { status, .. } => retryable_status(*status),
            S3Error::Transport(e) => retryable_error(e),
            S3Error::Read(_) => true,
            S3Error::Answer(_) => false,
        }
    }
}

impl std::error::Error for S3Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            S3Error::Transport(e) => Some(e.as_ref()),
            S3Error::Read(e) => Some(e),
            S3Error::Status { .. } | S3Error::Answer(_) => None,
        }
    }
}

fn remote(action: &'static str, key: &str, e: S3Error) -> StorageError {
    StorageError::Remote { action, key: key.to_string(), source: Box::new(e) }
}

/// The body of a small answer (XML, the owner text) as text, at most `limit` bytes: a body
/// that fails or is longer is a read error of `action` on `key`.
fn answer_text(answer: &mut Answer, limit: u64, action: &'static str, key: &str) -> Result<String, StorageError> {
    answer
        .body_mut()
        .with_config()
        .limit(limit)
        .read_to_string()
        .map_err(|e| remote(action, key, S3Error::Read(io::Error::other(e))))
}

/// Whether an answer with this status is worth trying again: the store's own trouble (5xx,
/// but not 501 Not Implemented, which will not change) or "slow down" (429; S3's `SlowDown`
/// is a 503).
pub fn retryable_status(status: u16) -> bool {
    (status >= 500 && status != 501) || status == 429
}

/// Whether a transport failure is worth trying again: the connection, not the request.
fn retryable_error(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound
    )
}

/// The `<Code>` of an S3 error document.
fn error_code(body: &str) -> Option<String> {
    let start = body.find("<Code>")? + "<Code>".len();
    let end = body[start..].find("</Code>")? + start;
    Some(body[start..end].to_string())
}

/// One page of a `ListObjectsV2` answer: the keys with their sizes, and the token of the next.
#[derive(Debug, PartialEq, Eq)]
struct Listing {
    objects: Vec<Object>,
    next_continuation_token: Option<String>,
}

/// One `<Contents>` of a listing: its key, size, and `<LastModified>` (Unix seconds) if the
/// server sent a readable one.
#[derive(Debug, PartialEq, Eq)]
struct Object {
    key: String,
    size: u64,
    modified: Option<i64>,
}

/// An ISO 8601 UTC time as S3 writes `<LastModified>` (`2024-01-02T03:04:05.000Z`), in Unix
/// seconds; `None` for anything else (the caller then treats the object as young).
fn parse_last_modified(t: &str) -> Option<i64> {
    let t = t.trim();
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, u32, u32) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let time = time.strip_suffix('Z')?;
    let time = time.split('.').next()?;
    let mut hms = time.splitn(3, ':');
    let (h, mi, sec): (i64, i64, i64) = (hms.next()?.parse().ok()?, hms.next()?.parse().ok()?, hms.next()?.parse().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    Some(crate::tz::days_from_civil(y, m, day) * 86_400 + h * 3600 + mi * 60 + sec)
}

/// The text of the first `<tag>...</tag>` in `xml`, and what follows it.
fn element<'a>(xml: &'a str, tag: &str) -> Option<(&'a str, &'a str)> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some((&xml[start..end], &xml[end + close.len()..]))
}

/// Undoes XML's five entities and numeric references (keys are ours, so plain ASCII, but a
/// stray key may hold anything).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Reads the `<Contents>` (`<Key>`, `<Size>`) and `<NextContinuationToken>` of a listing, by
/// hand: servers differ in what else they send (s3s-fs leaves out ETags, which the typed
/// parser of rusty-s3 requires), and this is all the store needs.
/// Decodes `%XX` escapes (and `+` as a space, as S3's url encoding type writes spaces);
/// `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn parse_listing(xml: &str) -> Result<Listing, String> {
    if !xml.contains("<ListBucketResult") {
        return Err("not a ListBucketResult".into());
    }
    // rusty-s3 asks for `encoding-type=url`; AWS and Garage then send every Key URL-encoded
    // (`nar%2F1hv0....nar.xz`) and say so; s3s-fs ignores the request and sends them plain.
    let url_encoded = element(xml, "EncodingType").is_some_and(|(t, _)| t.trim().eq_ignore_ascii_case("url"));
    let mut objects = Vec::new();
    let mut rest = xml;
    while let Some((contents, after)) = element(rest, "Contents") {
        let key = element(contents, "Key").ok_or("a <Contents> without <Key>")?.0;
        let size = element(contents, "Size").ok_or("a <Contents> without <Size>")?.0;
        let size = size.trim().parse().map_err(|_| format!("size {size:?}"))?;
        let key = unescape(key);
        let key = if url_encoded { percent_decode(&key).ok_or_else(|| format!("key {key:?}: bad URL encoding"))? } else { key };
        let modified = element(contents, "LastModified").and_then(|(t, _)| parse_last_modified(t));
        objects.push(Object { key, size, modified });
        rest = after;
    }
    let truncated = element(xml, "IsTruncated").is_some_and(|(t, _)| t.trim() == "true");
    let next_continuation_token = element(xml, "NextContinuationToken").map(|(t, _)| unescape(t)).filter(|_| truncated);
    Ok(Listing { objects, next_continuation_token })
}

/// Keys per `DeleteObjects` request: the most S3 takes in one.
pub const DELETE_MANY_MAX: usize = 1000;

/// The per-key failures of a `DeleteObjects` answer (`<Error>` elements; a quiet request
/// lists nothing else): key, code and message. S3 reports no error for a missing key, and a
/// `NoSuchKey` some stores send anyway is no failure either.
fn delete_errors(xml: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some((error, after)) = element(rest, "Error") {
        let field = |tag| element(error, tag).map(|(t, _)| unescape(t)).unwrap_or_default();
        let code = field("Code");
        if code != "NoSuchKey" {
            out.push((field("Key"), code, field("Message")));
        }
        rest = after;
    }
    out
}

/// What every request needs: shared with the streams of hits, which may start a ranged GET.
struct Inner {
    bucket: Bucket,
    credentials: Credentials,
    agent: ureq::Agent,
    retry: Retry,
    redirect: bool,
    /// Whether the store takes `DeleteObjects`; cleared at its first refusal.
    delete_many: std::sync::atomic::AtomicBool,
}

type Answer = http::Response<ureq::Body>;

impl Inner {
    /// Sends the request `make` builds, with retries; any status is an answer (the caller
    /// judges it), except those [`retryable_status`] says to try again while attempts remain.
    fn send(&self, action: &'static str, key: &str, make: &dyn Fn() -> Result<Answer, ureq::Error>) -> Result<Answer, StorageError> {
        let mut pause = self.retry.first_pause;
        let attempts = self.retry.attempts.max(1);
        for attempt in 1..=attempts {
            let last = attempt == attempts;
            match make() {
                Ok(answer) if !last && retryable_status(answer.status().as_u16()) => {
                    log::warn!("s3: {action} {key}: HTTP {} (attempt {attempt} of {attempts}); trying again", answer.status().as_u16());
                }
                Ok(answer) => return Ok(answer),
                Err(e) if !last && retryable_error(&e) => {
                    log::warn!("s3: {action} {key}: {e} (attempt {attempt} of {attempts}); trying again");
                }
                Err(e) => return Err(remote(action, key, S3Error::Transport(Box::new(e)))),
            }
            std::thread::sleep(pause);
            pause = pause.saturating_mul(2);
        }
        Err(remote(action, key, S3Error::Answer("no attempt made".into())))
    }

    fn get(&self, action: &'static str, key: &str, url: &str, range_from: Option<u64>) -> Result<Answer, StorageError> {
        self.send(action, key, &|| {
            let mut req = http::Request::get(url);
            if let Some(start) = range_from {
                req = req.header("range", format!("bytes={start}-"));
            }
            self.agent.run(req.body(()).map_err(ureq::Error::from)?)
        })
    }

    fn head(&self, action: &'static str, key: &str, url: &str) -> Result<Answer, StorageError> {
        self.send(action, key, &|| self.agent.run(http::Request::head(url).body(()).map_err(ureq::Error::from)?))
    }

    fn delete(&self, action: &'static str, key: &str, url: &str) -> Result<Answer, StorageError> {
        self.send(action, key, &|| self.agent.run(http::Request::delete(url).body(()).map_err(ureq::Error::from)?))
    }

    /// A PUT or POST of `body`, with `headers` (which must be the ones signed into `url`).
    fn upload(
        &self,
        action: &'static str,
        key: &str,
        method: http::Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, StorageError> {
        self.send(action, key, &|| {
            let mut req = http::Request::builder().method(method.clone()).uri(url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            self.agent.run(req.body(body).map_err(ureq::Error::from)?)
        })
    }

    /// The error for an answer with an unexpected status (its S3 error code read from the body).
    fn refused(&self, action: &'static str, key: &str, mut answer: Answer) -> StorageError {
        let status = answer.status().as_u16();
        let body = answer.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
        remote(action, key, S3Error::Status { status, code: error_code(&body) })
    }

    /// GETs `key` from `range_from` (or whole): `None` if it is not there.
    fn get_object(&self, action: &'static str, key: &str, range_from: Option<u64>) -> Result<Option<Answer>, StorageError> {
        let url = GetObject::new(&self.bucket, Some(&self.credentials), key).sign(SIGNED_FOR);
        let answer = self.get(action, key, url.as_str(), range_from)?;
        match answer.status().as_u16() {
            200 | 206 => Ok(Some(answer)),
            404 => Ok(None),
            _ => Err(self.refused(action, key, answer)),
        }
    }

    fn put_object(&self, action: &'static str, key: &str, bytes: &[u8], file_hash: Option<&str>) -> Result<(), StorageError> {
        let mut put = PutObject::new(&self.bucket, Some(&self.credentials), key);
        let mut headers = Vec::new();
        if let Some(h) = file_hash {
            put.headers_mut().insert(FILE_HASH_HEADER, h.to_string());
            headers.push((FILE_HASH_HEADER, h));
        }
        let url = put.sign(SIGNED_FOR);
        let answer = self.upload(action, key, http::Method::PUT, url.as_str(), &headers, bytes)?;
        match answer.status().as_u16() {
            200 | 201 | 204 => Ok(()),
            _ => Err(self.refused(action, key, answer)),
        }
    }

    fn delete_object(&self, key: &str) -> Result<(), StorageError> {
        let url = DeleteObject::new(&self.bucket, Some(&self.credentials), key).sign(SIGNED_FOR);
        let answer = self.delete("removing", key, url.as_str())?;
        match answer.status().as_u16() {
            200 | 202 | 204 | 404 => Ok(()),
            _ => Err(self.refused("removing", key, answer)),
        }
    }

    /// Removes `keys` (at most [`DELETE_MANY_MAX`]) with one `DeleteObjects` request.
    /// `Ok(false)`: the store does not take such requests; nothing was removed, and none will
    /// be tried again.
    fn delete_objects(&self, keys: &[String]) -> Result<bool, StorageError> {
        use std::sync::atomic::Ordering::Relaxed;
        const ACTION: &str = "removing";
        let objects: Vec<ObjectIdentifier> = keys.iter().map(|k| ObjectIdentifier::new(k.clone())).collect();
        let mut request = DeleteObjects::new(&self.bucket, Some(&self.credentials), objects.iter());
        request.set_quiet(true);
        let url = request.sign(SIGNED_FOR);
        let (body, md5) = request.body_with_md5();
        let what = format!("{} objects ({}, ...)", keys.len(), keys.first().map_or("", String::as_str));
        let headers = [("content-md5", md5.as_str()), ("content-type", "application/xml")];
        let mut answer = self.upload(ACTION, &what, http::Method::POST, url.as_str(), &headers, body.as_bytes())?;
        let status = answer.status().as_u16();
        let text = answer_text(&mut answer, 4 << 20, ACTION, &what);
        let unsupported = |code: Option<&str>| matches!(status, 405 | 501) || code == Some("NotImplemented");
        match (status, text) {
            (200, Ok(xml)) => match delete_errors(&xml).into_iter().next() {
                None => Ok(true),
                Some((key, code, message)) => Err(remote(ACTION, &key, S3Error::Answer(format!("{code}: {message}")))),
            },
            (200, Err(e)) => Err(e),
            (_, text) => {
                let code = text.ok().as_deref().and_then(error_code);
                if unsupported(code.as_deref()) {
                    if self.delete_many.swap(false, Relaxed) {
                        log::warn!("s3: the store does not take DeleteObjects (HTTP {status}); removing objects one request each");
                    }
                    return Ok(false);
                }
                Err(remote(ACTION, &what, S3Error::Status { status, code }))
            }
        }
    }

    /// Removes `keys`: one `DeleteObjects` request where the store takes them, else a DELETE
    /// each.
    fn delete_keys(&self, keys: &[String]) -> Result<(), StorageError> {
        if keys.len() > 1 && self.delete_many.load(std::sync::atomic::Ordering::Relaxed) && self.delete_objects(keys)? {
            return Ok(());
        }
        super::first_failure(keys.iter().map(|k| self.delete_object(k)))
    }

    /// Every key under `prefix` with its size, a page at a time, until `each` says stop.
    fn list(&self, prefix: &str, max_keys: usize, mut each: impl FnMut(String, u64) -> bool) -> Result<(), StorageError> {
        self.list_objects(prefix, max_keys, |o| each(o.key, o.size))
    }

    /// Every object under `prefix`, a page (`max_keys`) at a time, until `each` says stop:
    /// one page is in memory at a time, never the whole listing.
    fn list_objects(&self, prefix: &str, max_keys: usize, mut each: impl FnMut(Object) -> bool) -> Result<(), StorageError> {
        let mut token: Option<String> = None;
        loop {
            let mut list = ListObjectsV2::new(&self.bucket, Some(&self.credentials));
            list.with_prefix(prefix);
            list.with_max_keys(max_keys);
            if let Some(t) = &token {
                list.with_continuation_token(t.as_str());
            }
            let url = list.sign(SIGNED_FOR);
            let mut answer = self.get("listing", prefix, url.as_str(), None)?;
            if answer.status().as_u16() != 200 {
                return Err(self.refused("listing", prefix, answer));
            }
            let text = answer_text(&mut answer, 16 << 20, "listing", prefix)?;
            let page = parse_listing(&text).map_err(|why| remote("listing", prefix, S3Error::Answer(why)))?;
            for object in page.objects {
                if !each(object) {
                    return Ok(());
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(()),
            }
        }
    }
}

/// The body of a hit: the GET's answer, read as it comes.
struct ObjectStream {
    body: ureq::BodyReader<'static>,
    inner: Arc<Inner>,
    key: String,
}

impl Read for ObjectStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

impl crate::http::Streamed for ObjectStream {
    fn from_offset(self: Box<Self>, start: u64) -> io::Result<Box<dyn Read + Send>> {
        // The whole body's answer is dropped unread (its connection closed), and the range
        // asked for: a resumed transfer does not pull the bytes before it through ncps.
        let ObjectStream { inner, key, .. } = *self;
        match inner.get_object("reading", &key, Some(start)).map_err(io::Error::other)? {
            Some(answer) if answer.status().as_u16() == 206 => {
                Ok(Box::new(ObjectStream { body: answer.into_body().into_reader(), inner, key }))
            }
            Some(answer) => Err(io::Error::other(format!("{key}: a range was answered {}", answer.status().as_u16()))),
            None => Err(io::Error::new(io::ErrorKind::NotFound, format!("{key}: removed while being sent"))),
        }
    }
}

pub struct S3Store {
    inner: Arc<Inner>,
    describe: String,
}

fn is_shard_char(b: u8) -> bool {
    b.is_ascii_digit() || b.is_ascii_lowercase()
}

impl S3Store {
    /// Checks the settings and that the bucket answers with these credentials (one
    /// `HeadBucket`), so that a wrong key or an unreachable endpoint stops the start.
    pub fn open(settings: &S3Settings) -> Result<S3Store, StorageError> {
        let describe = format!("s3://{} at {}", settings.bucket, settings.endpoint);
        let bad = |why: String| remote("opening", &describe, S3Error::Answer(why));
        let endpoint = settings.endpoint.parse().map_err(|e| bad(format!("endpoint {:?}: {e}", settings.endpoint)))?;
        let style = if settings.force_path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
        let bucket = Bucket::new(endpoint, style, settings.bucket.clone(), settings.region.clone())
            .map_err(|e| bad(format!("endpoint {:?} with bucket {:?}: {e}", settings.endpoint, settings.bucket)))?;
        let credentials = Credentials::new(settings.access_key_id.clone(), settings.secret_access_key.clone());
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(crate::tls::root_certs())))
            .build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_resolve(Some(Duration::from_secs(10)))
            // CompleteMultipartUpload of a large object may take a while before its head.
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .timeout_send_request(Some(Duration::from_secs(60)))
            .user_agent(concat!("ncps/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(16)
            .tls_config(tls)
            .build()
            .new_agent();
        let inner = Arc::new(Inner {
            bucket,
            credentials,
            agent,
            retry: settings.retry,
            redirect: settings.redirect,
            delete_many: std::sync::atomic::AtomicBool::new(true),
        });
        let url = HeadBucket::new(&inner.bucket, Some(&inner.credentials)).sign(SIGNED_FOR);
        let answer = inner.head("opening", &describe, url.as_str())?;
        match answer.status().as_u16() {
            200 => Ok(S3Store { inner, describe }),
            // A HEAD has no body, so no error code: say what the status means.
            403 => Err(remote("opening", &describe, S3Error::Status { status: 403, code: Some("AccessDenied: check the access key and secret".into()) })),
            404 => Err(remote("opening", &describe, S3Error::Status { status: 404, code: Some("NoSuchBucket".into()) })),
            _ => Err(inner.refused("opening", &describe, answer)),
        }
    }

    /// Claims the bucket for the ncps whose owner text is `owner` (its id first, then where it
    /// runs, for the message): the object `ncps-owner` is written if absent. `Ok(None)` when
    /// the bucket is ours (now or already); `Ok(Some(text))` when another ncps holds it.
    ///
    /// Why: each ncps keeps its own index and removes objects its index does not vouch for
    /// after an unclean stop, so two on one bucket would remove each other's entries. Two
    /// starting in the same second can both see no owner (S3 has no portable create-if-absent);
    /// the claim guards the common mistake, a second replica pointed at the same bucket.
    pub fn claim(&self, owner: &str) -> Result<Option<String>, StorageError> {
        let id = |t: &str| t.lines().next().unwrap_or("").trim().to_string();
        if let Some(text) = self.owner()? {
            return Ok(if id(&text) == id(owner) { None } else { Some(text) });
        }
        self.inner.put_object("claiming", OWNER_KEY, owner.as_bytes(), None)?;
        Ok(None)
    }

    /// The text of the owner object ([`S3Store::claim`]), if the bucket is claimed; read only
    /// (`ncps fsck` checks it, and claims nothing).
    pub fn owner(&self) -> Result<Option<String>, StorageError> {
        let Some(mut answer) = self.inner.get_object("reading", OWNER_KEY, None)? else { return Ok(None) };
        let text = answer_text(&mut answer, 64 << 10, "reading", OWNER_KEY)?;
        Ok(Some(text))
    }

    /// Every key under `prefix`, listed `page` keys a request (for the tests of paging).
    #[cfg(test)]
    pub(crate) fn keys_paged(&self, prefix: &str, page: usize) -> Result<Vec<String>, StorageError> {
        let mut keys = Vec::new();
        self.inner.list(prefix, page, |k, _| {
            keys.push(k);
            true
        })?;
        Ok(keys)
    }

    fn nar_key(name: &NarName) -> String {
        format!("{NAR_PREFIX}{name}")
    }

    fn narinfo_key(hash: &StorePathHash) -> String {
        format!("{NARINFO_PREFIX}{hash}.narinfo")
    }

    fn zstd_key(name: &NarName) -> String {
        format!("{ZSTD_PREFIX}{name}.zst")
    }

    /// A stored object as a stream: `None` if it is not there.
    fn stream(&self, key: String) -> Result<Option<Blob>, StorageError> {
        let Some(answer) = self.inner.get_object("reading", &key, None)? else { return Ok(None) };
        let len = content_length(&answer).ok_or_else(|| remote("reading", &key, S3Error::Answer("no Content-Length".into())))?;
        let file_hash = answer.headers().get(FILE_HASH_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| Hash::parse(v).ok());
        let reader = Box::new(ObjectStream { body: answer.into_body().into_reader(), inner: self.inner.clone(), key });
        Ok(Some(Blob::Reader { reader, len, file_hash }))
    }

    /// Uploads the staged file to `key`: one PUT up to [`SINGLE_PUT_MAX`], else a multipart
    /// upload, aborted on any failure.
    fn upload_file(&self, key: &str, staged: &TempFile, file_hash: Option<&str>) -> Result<(), StorageError> {
        let file = staged.reopen()?;
        let path = staged.path().to_path_buf();
        let len = file.metadata().map_err(|e| StorageError::io("reading", path.clone(), e))?.len();
        if len <= SINGLE_PUT_MAX {
            let mut bytes = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0).map_err(|e| StorageError::io("reading", path, e))?;
            return self.inner.put_object("uploading", key, &bytes, file_hash);
        }
        let inner = &self.inner;
        let mut create = CreateMultipartUpload::new(&inner.bucket, Some(&inner.credentials), key);
        let mut headers = Vec::new();
        if let Some(h) = file_hash {
            create.headers_mut().insert(FILE_HASH_HEADER, h.to_string());
            headers.push((FILE_HASH_HEADER, h));
        }
        let url = create.sign(SIGNED_FOR);
        let mut answer = inner.upload("starting the upload of", key, http::Method::POST, url.as_str(), &headers, &[])?;
        if answer.status().as_u16() != 200 {
            return Err(inner.refused("starting the upload of", key, answer));
        }
        let text = answer_text(&mut answer, 64 << 10, "starting the upload of", key)?;
        let created = CreateMultipartUpload::parse_response(&text)
            .map_err(|e| remote("starting the upload of", key, S3Error::Answer(e.to_string())))?;
        let upload_id = created.upload_id().to_string();
        let result = self.upload_parts(key, &upload_id, &file, &path, len);
        if result.is_err() {
            let url = AbortMultipartUpload::new(&inner.bucket, Some(&inner.credentials), key, &upload_id).sign(SIGNED_FOR);
            match inner.delete("aborting the upload of", key, url.as_str()) {
                Ok(a) if matches!(a.status().as_u16(), 200 | 204 | 404) => {}
                Ok(a) => log::warn!("s3: aborting the upload of {key}: HTTP {}; its parts stay until a lifecycle rule removes them", a.status().as_u16()),
                Err(e) => log::warn!("s3: {e}; its parts stay until a lifecycle rule removes them"),
            }
        }
        result
    }

    fn upload_parts(&self, key: &str, upload_id: &str, file: &std::fs::File, path: &std::path::Path, len: u64) -> Result<(), StorageError> {
        let inner = &self.inner;
        let part_size = SINGLE_PUT_MAX.max(len.div_ceil(MAX_PARTS));
        let mut buf = vec![0u8; part_size as usize];
        let mut etags = Vec::new();
        let mut offset = 0;
        let mut number: u16 = 1;
        while offset < len {
            let n = part_size.min(len - offset) as usize;
            std::os::unix::fs::FileExt::read_exact_at(file, &mut buf[..n], offset)
                .map_err(|e| StorageError::io("reading", path.to_path_buf(), e))?;
            let url = UploadPart::new(&inner.bucket, Some(&inner.credentials), key, number, upload_id).sign(SIGNED_FOR);
            let answer = inner.upload("uploading a part of", key, http::Method::PUT, url.as_str(), &[], &buf[..n])?;
            if answer.status().as_u16() != 200 {
                return Err(inner.refused("uploading a part of", key, answer));
            }
            let etag = answer
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| remote("uploading a part of", key, S3Error::Answer("no ETag".into())))?;
            etags.push(etag.to_string());
            offset += n as u64;
            number += 1;
        }
        let complete =
            CompleteMultipartUpload::new(&inner.bucket, Some(&inner.credentials), key, upload_id, etags.iter().map(String::as_str));
        let url = complete.sign(SIGNED_FOR);
        let body = complete.body();
        let mut answer = inner.upload("completing the upload of", key, http::Method::POST, url.as_str(), &[], body.as_bytes())?;
        let status = answer.status().as_u16();
        // S3 may answer 200 and say in the body that it failed.
        let text = answer.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
        if status != 200 || text.contains("<Error>") {
            return Err(remote("completing the upload of", key, S3Error::Status { status, code: error_code(&text) }));
        }
        Ok(())
    }

    /// The entries of one shard below `prefix`, and the keys there that are not entries.
    fn list_shard<N>(&self, prefix: &str, shard: &str, parse: impl Fn(&str) -> Option<N>) -> Result<Shard<N>, StorageError> {
        let mut entries = Vec::new();
        let mut strays = Vec::new();
        self.inner.list_objects(&format!("{prefix}{shard}"), 1000, |o| {
            match o.key.strip_prefix(prefix).and_then(&parse) {
                Some(name) => entries.push(Listed { name, len: o.size, modified: o.modified }),
                None => strays.push(Stray(o.key.into())),
            }
            true
        })?;
        Ok(Shard { entries, strays })
    }

    /// Removes the objects `keys`: [`DELETE_MANY_MAX`] to a request where the store takes
    /// `DeleteObjects`, else a DELETE each, the requests on a few threads. Every key is tried;
    /// the first failure is returned.
    fn remove_keys(&self, keys: Vec<String>) -> Result<(), StorageError> {
        const THREADS: usize = 8;
        let per = if self.inner.delete_many.load(std::sync::atomic::Ordering::Relaxed) {
            DELETE_MANY_MAX
        } else if keys.len() < 16 {
            // Too few to be worth threads: one after the other.
            keys.len().max(1)
        } else {
            keys.len().div_ceil(THREADS)
        };
        let chunks: Vec<&[String]> = keys.chunks(per).collect();
        if chunks.len() <= 1 {
            return super::first_failure(chunks.into_iter().map(|c| self.inner.delete_keys(c)));
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let (chunks, next) = (&chunks, &next);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS.min(chunks.len()))
                .map(|_| {
                    s.spawn(move || {
                        let each = std::iter::from_fn(|| chunks.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
                        super::first_failure(each.map(|c| self.inner.delete_keys(c)))
                    })
                })
                .collect();
            super::first_failure(workers.into_iter().map(|w| super::joined(w.join(), "removing objects")))
        })
    }
}

fn content_length(answer: &Answer) -> Option<u64> {
    answer.headers().get("content-length")?.to_str().ok()?.parse().ok()
}

impl BlobStore for S3Store {
    fn narinfo(&self, hash: &StorePathHash) -> Result<Option<Blob>, StorageError> {
        let key = Self::narinfo_key(hash);
        let Some(mut answer) = self.inner.get_object("reading", &key, None)? else { return Ok(None) };
        let bytes = answer
            .body_mut()
            .with_config()
            .limit(NARINFO_MAX)
            .read_to_vec()
            .map_err(|e| remote("reading", &key, S3Error::Read(io::Error::other(e))))?;
        Ok(Some(Blob::Bytes(bytes)))
    }

    fn nar(&self, name: &NarName) -> Result<Option<Blob>, StorageError> {
        self.stream(Self::nar_key(name))
    }

    fn nar_len(&self, name: &NarName) -> Result<Option<u64>, StorageError> {
        let key = Self::nar_key(name);
        let url = HeadObject::new(&self.inner.bucket, Some(&self.inner.credentials), &key).sign(SIGNED_FOR);
        let answer = self.inner.head("reading", &key, url.as_str())?;
        match answer.status().as_u16() {
            200 => Ok(content_length(&answer)),
            404 => Ok(None),
            status => Err(remote("reading", &key, S3Error::Status { status, code: None })),
        }
    }

    fn put_narinfo(&self, hash: &StorePathHash, bytes: &[u8], _staging: &Staging) -> Result<(), StorageError> {
        self.inner.put_object("uploading", &Self::narinfo_key(hash), bytes, None)
    }

    fn put_nar(&self, name: &NarName, staged: TempFile, file_hash: &Hash) -> Result<(), StorageError> {
        // `staged` is dropped (its file removed) once uploaded, or failed.
        self.upload_file(&Self::nar_key(name), &staged, Some(&file_hash.to_string()))
    }

    fn nar_zstd(&self, name: &NarName) -> Result<Option<Blob>, StorageError> {
        self.stream(Self::zstd_key(name))
    }

    fn put_nar_zstd(&self, name: &NarName, staged: TempFile) -> Result<(), StorageError> {
        self.upload_file(&Self::zstd_key(name), &staged, None)
    }

    fn remove_nar_zstd(&self, name: &NarName) -> Result<(), StorageError> {
        self.inner.delete_object(&Self::zstd_key(name))
    }

    fn remove_all_nar_zstd(&self) -> Result<u64, StorageError> {
        // A thousand keys at a time, never the whole listing in memory. Deleting behind the
        // listing is safe: a continuation token names a position, not a snapshot.
        const BATCH: usize = 1000;
        let mut keys = Vec::new();
        let mut removed = 0u64;
        let mut failed = None;
        self.inner.list(ZSTD_PREFIX, BATCH, |key, _| {
            keys.push(key);
            if keys.len() < BATCH {
                return true;
            }
            removed += keys.len() as u64;
            match self.remove_keys(std::mem::take(&mut keys)) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        removed += keys.len() as u64;
        self.remove_keys(keys)?;
        Ok(removed)
    }

    fn nar_file_hash(&self, blob: &Blob) -> Option<Hash> {
        match blob {
            Blob::Reader { file_hash, .. } => *file_hash,
            _ => None,
        }
    }

    fn remove_narinfo(&self, hash: &StorePathHash) -> Result<(), StorageError> {
        self.inner.delete_object(&Self::narinfo_key(hash))
    }

    fn remove_nar(&self, name: &NarName) -> Result<(), StorageError> {
        self.inner.delete_object(&Self::nar_key(name))?;
        self.remove_nar_zstd(name)
    }

    fn remove_narinfos(&self, hashes: &[StorePathHash]) -> Result<(), StorageError> {
        self.remove_keys(hashes.iter().map(Self::narinfo_key).collect())
    }

    fn remove_nars(&self, names: &[NarName]) -> Result<(), StorageError> {
        self.remove_keys(names.iter().map(Self::nar_key).collect())?;
        // Only NARs stored plain have a copy.
        self.remove_keys(names.iter().filter(|n| n.as_str().ends_with(".nar")).map(Self::zstd_key).collect())
    }

    fn list_narinfos(&self, shard: &str) -> Result<Shard<StorePathHash>, StorageError> {
        self.list_shard(NARINFO_PREFIX, shard, |n| n.strip_suffix(".narinfo").and_then(StorePathHash::parse))
    }

    fn list_nars(&self, shard: &str) -> Result<Shard<NarName>, StorageError> {
        self.list_shard(NAR_PREFIX, shard, NarName::parse)
    }

    fn strays_outside_shards(&self) -> Result<Vec<Stray>, StorageError> {
        // Keys whose name does not start with two shard characters: no shard listing finds
        // them. This lists every key once (a thousand a request); it runs only in the check
        // after an unclean stop and in fsck.
        let mut out = Vec::new();
        for prefix in [NAR_PREFIX, NARINFO_PREFIX] {
            self.inner.list(prefix, 1000, |key, _| {
                let name = key.strip_prefix(prefix).unwrap_or(&key).as_bytes();
                if name.len() < 2 || !is_shard_char(name[0]) || !is_shard_char(name[1]) {
                    out.push(Stray(key.into()));
                }
                true
            })?;
        }
        Ok(out)
    }

    fn remove_stray(&self, stray: &Stray) -> Result<(), StorageError> {
        let key = stray.0.to_string_lossy();
        // Only ever ours: the bucket may hold other things beside the cache.
        if ![NAR_PREFIX, NARINFO_PREFIX, ZSTD_PREFIX].iter().any(|p| key.starts_with(p)) {
            return Err(remote("removing", &key, S3Error::Answer("not a key of the cache".into())));
        }
        self.inner.delete_object(&key)
    }

    fn holds_anything(&self) -> Result<bool, StorageError> {
        for prefix in [NAR_PREFIX, NARINFO_PREFIX] {
            let mut found = false;
            self.inner.list(prefix, 1, |_, _| {
                found = true;
                false
            })?;
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn reads_are_local(&self) -> bool {
        false
    }

    fn nar_redirect(&self, name: &NarName) -> Option<String> {
        let key = Self::nar_key(name);
        self.inner.redirect.then(|| GetObject::new(&self.inner.bucket, Some(&self.inner.credentials), &key).sign(REDIRECT_VALID).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_stores_own_trouble_and_slow_down_are_tried_again() {
        for status in [500, 502, 503, 504, 429] {
            assert!(retryable_status(status), "{status}");
        }
        for status in [200, 206, 400, 403, 404, 409, 412, 501] {
            assert!(!retryable_status(status), "{status}");
        }
    }

    #[test]
    fn a_delete_objects_answer_names_its_failed_keys_but_not_missing_ones() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Error><Key>nar/a&amp;b</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>
  <Error><Key>nar/gone</Key><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>
</DeleteResult>"#;
        assert_eq!(delete_errors(xml), vec![("nar/a&b".into(), "AccessDenied".into(), "Access Denied".into())]);
        assert!(delete_errors("<DeleteResult></DeleteResult>").is_empty());
    }

    #[test]
    fn the_error_code_of_an_s3_error_document_is_read() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>x</Message></Error>";
        assert_eq!(error_code(body).as_deref(), Some("NoSuchBucket"));
        assert_eq!(error_code("<html>"), None);
    }

    #[test]
    fn a_listing_page_is_read_by_hand_with_or_without_etags_and_its_token_only_when_truncated() {
        let page = "<?xml version=\"1.0\"?><ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
            <Name>b</Name><IsTruncated>true</IsTruncated><NextContinuationToken>a&amp;b</NextContinuationToken>\
            <Contents><Key>nar/1.nar</Key><LastModified>2024-01-02T03:04:05.000Z</LastModified><ETag>&quot;x&quot;</ETag><Size>12</Size></Contents>\
            <Contents><Key>nar/a&lt;b</Key><Size>0</Size></Contents></ListBucketResult>";
        let listing = parse_listing(page).unwrap();
        let pairs: Vec<_> = listing.objects.iter().map(|o| (o.key.as_str(), o.size, o.modified)).collect();
        assert_eq!(pairs, vec![("nar/1.nar", 12, Some(1_704_164_645)), ("nar/a<b", 0, None)]);
        assert_eq!(listing.next_continuation_token.as_deref(), Some("a&b"));
        let last = page.replace("<IsTruncated>true", "<IsTruncated>false");
        assert_eq!(parse_listing(&last).unwrap().next_continuation_token, None);
        assert!(parse_listing("<Error><Code>x</Code></Error>").is_err());
        assert_eq!(unescape("&#65;&#x42;&bogus;&"), "AB&bogus;&");
    }

    #[test]
    fn url_encoded_keys_are_decoded_when_the_listing_says_so_as_garage_and_aws_send_them() {
        let page = "<ListBucketResult><EncodingType>url</EncodingType><IsTruncated>false</IsTruncated>\
            <Contents><Key>nar%2F1hv0abc.nar.xz</Key><Size>3</Size></Contents>\
            <Contents><Key>narinfo%2Fa+b%25</Key><Size>1</Size></Contents></ListBucketResult>";
        let listing = parse_listing(page).unwrap();
        let pairs: Vec<_> = listing.objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
        assert_eq!(pairs, vec![("nar/1hv0abc.nar.xz", 3), ("narinfo/a b%", 1)]);
        let plain = page.replace("<EncodingType>url</EncodingType>", "");
        assert_eq!(parse_listing(&plain).unwrap().objects[0].key, "nar%2F1hv0abc.nar.xz", "s3s-fs: sent as they are");
        assert!(parse_listing(&page.replace("%2F1hv0", "%zz")).is_err(), "a malformed escape is an error, not a key");
    }

    #[test]
    fn last_modified_is_read_as_unix_seconds_and_anything_else_is_unknown() {
        assert_eq!(parse_last_modified("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_last_modified("2024-01-02T03:04:05.000Z"), Some(1_704_164_645));
        assert_eq!(parse_last_modified(" 2024-01-02T03:04:05Z "), Some(1_704_164_645));
        for bad in ["", "2024-01-02", "2024-13-02T03:04:05Z", "2024-01-02T03:04:05+01:00", "yesterday"] {
            assert_eq!(parse_last_modified(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn settings_never_print_the_secret() {
        let s = S3Settings {
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            region: "us-east-1".into(),
            access_key_id: "AKID".into(),
            secret_access_key: "very-secret-value".into(),
            force_path_style: true,
            redirect: false,
            retry: Retry::default(),
        };
        assert!(!format!("{s:?}").contains("very-secret-value"));
    }
}

/// A real S3 server for the tests: s3s-fs (tests/s3s.sh installs it), on a loopback port,
/// storing in a temp directory, killed on drop.
#[cfg(test)]
pub(crate) mod test_server {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub const ACCESS_KEY: &str = "ncps-test-access";
    pub const SECRET_KEY: &str = "ncps-test-secret-9f8e7d6c5b4a";
    pub const BUCKET: &str = "ncps-test";

    /// The s3s-fs binary (`crate::test_tools`); `None` (the caller skips) only outside CI.
    pub fn binary() -> Option<PathBuf> {
        crate::test_tools::installed(&crate::test_tools::S3S_FS)
    }

    pub struct S3sFs {
        child: Child,
        pub root: PathBuf,
        pub port: u16,
    }

    impl S3sFs {
        /// Starts s3s-fs with an empty bucket [`BUCKET`]; `None` when skipped.
        pub fn start(label: &str) -> Option<S3sFs> {
            let bin = binary()?;
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let root = std::env::temp_dir().join(format!("ncps-s3s-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join(BUCKET)).unwrap();
            Some(S3sFs { child: spawn(&bin, &root, port), root, port })
        }

        pub fn endpoint(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        pub fn settings(&self) -> super::S3Settings {
            super::S3Settings {
                endpoint: self.endpoint(),
                bucket: BUCKET.into(),
                region: "us-east-1".into(),
                access_key_id: ACCESS_KEY.into(),
                secret_access_key: SECRET_KEY.into(),
                force_path_style: true,
                redirect: false,
                retry: super::Retry { attempts: 3, first_pause: Duration::from_millis(50) },
            }
        }
    }

    /// Starts s3s-fs on `port` and waits until it accepts connections.
    pub fn spawn(bin: &Path, root: &Path, port: u16) -> Child {
        let mut child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "s3s-fs did not listen on {port}");
            assert!(child.try_wait().unwrap().is_none(), "s3s-fs exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    impl Drop for S3sFs {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
