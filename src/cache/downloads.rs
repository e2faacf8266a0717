//! NAR hits, and NAR misses as single-flight downloads: one thread per NAR in flight writes a
//! staged file while every client, arriving before or during the download, follows it as it
//! grows. Bytes are hashed as they stream ([`super::verify`]); the NAR gets its final name only
//! once its size and hash match the narinfo.
//!
//! The request that starts a download waits until an upstream starts sending (or none will),
//! so that a miss nobody could deliver is answered honestly: `404` when every upstream said
//! "not here", `502`/`504` when one could not answer ([`super::health`]).
//!
//! A NAR no narinfo here points at (its entry was evicted or deleted, but Nix keeps narinfos
//! for 30 days and then asks for the NAR URL directly) is fetched by the same name from the
//! configured upstreams and checked against the hash its name is made of (cache.nixos.org
//! names NARs `nar/<nix32 FileHash>.nar<ext>`): kept and completed only if the bytes match.

use super::flight::{Download, DownloadBody, Outcome, RelayError};
use super::health::{Attempt, Missed, Tally, Verdict};
use super::narinfos::body_of;
use super::resume::{resume_order, Resuming};
use super::verify::{copy_hashed, copy_hashed_parallel, CopyError, PARALLEL_FROM};
use super::{lock, sources, trust, Answer, Cache, CacheError};
use crate::http::Body;
use std::net::IpAddr;
use crate::index::NarRecord;
use crate::metrics::Kind;
use crate::nix::{Hash, NarName};
use crate::storage::TempFile;
use crate::upstream::{NarBody, UpstreamError};
use std::collections::HashMap;
use std::fmt;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a URL that failed stays at the back of the line.
const FAILED_URL_MEMORY: Duration = Duration::from_secs(300);

/// A download nobody waits for is looked at after each window this long: if it got less
/// than half of `--upstream-nar-min-rate` in it, its slot goes back (long enough that one
/// slow patch of a good upstream does not count, short enough against a 60 s base deadline).
const PROGRESS_WINDOW: Duration = Duration::from_secs(10);

/// Whether a client that holds `of_client` of the `running` downloads may start another,
/// with `max` slots in all: no address may hold more than its share
/// ([`crate::http::per_host_cap`], the rule for workers: all but a quarter, kept for the
/// others), so one host starting misses as fast as it can leaves slots to everyone else.
/// Joining a download in flight takes no slot and is always allowed.
pub fn slot_verdict(running: usize, of_client: usize, max: usize) -> Slot {
    if running >= max {
        return Slot::PoolFull;
    }
    let share = crate::http::per_host_cap(max);
    if of_client >= share {
        return Slot::ClientFull(share);
    }
    Slot::Free
}

/// What [`slot_verdict`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Free,
    /// Every slot is taken.
    PoolFull,
    /// This client holds its share (the number).
    ClientFull(usize),
}

/// The stand-in file of a download the disk could not stage: readers never read it (every
/// byte comes from memory), but a [`Download`] holds one.
fn nowhere() -> Result<std::fs::File, CacheError> {
    std::fs::File::open("/dev/null")
        .map_err(|e| CacheError::from(crate::storage::StorageError::io("opening", "/dev/null".into(), e)))
}

pub(super) struct State {
    running: Mutex<HashMap<NarName, Arc<Download>>>,
    /// Upstream NAR URLs that failed recently, tried last next time.
    pub(super) failed_urls: Mutex<HashMap<String, Instant>>,
}

impl State {
    pub(super) fn new() -> State {
        State { running: Mutex::new(HashMap::new()), failed_urls: Mutex::new(HashMap::new()) }
    }
}

/// Why fetching a NAR from one URL failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum FetchError {
    NotFound,
    Upstream(UpstreamError),
    /// The upstream announced another length than the narinfo's.
    WrongLength { announced: u64, expected: u64 },
    Read(CopyError<RelayError>),
    /// The body ended early.
    Short { got: u64, expected: u64 },
    HashMismatch { got: Hash, expected: Hash },
    /// No upstream has it (every candidate answered "not found", or none is configured).
    Nowhere,
    /// The download thread panicked (a bug); nothing was kept.
    Internal,
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::NotFound => f.write_str("not found"),
            FetchError::Upstream(e) => e.fmt(f),
            FetchError::WrongLength { announced, expected } => {
                write!(f, "upstream announces {announced} bytes, the narinfo {expected}")
            }
            FetchError::Read(CopyError::TooLong { limit }) => {
                write!(f, "longer than the {limit} bytes the narinfo says")
            }
            FetchError::Read(e) => e.fmt(f),
            FetchError::Short { got, expected } => write!(f, "ended after {got} of {expected} bytes"),
            FetchError::HashMismatch { got, expected } => {
                write!(f, "hash mismatch: got {got}, the narinfo says {expected}")
            }
            FetchError::Nowhere => f.write_str("no upstream has it"),
            FetchError::Internal => f.write_str("internal error"),
        }
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FetchError::Upstream(e) => Some(e),
            FetchError::Read(e) => Some(e),
            _ => None,
        }
    }
}

impl FetchError {
    /// `Some(timed_out)` when this says the upstream is unwell rather than that it answered
    /// badly (see [`UpstreamError::is_outage`]).
    fn outage(&self) -> Option<bool> {
        match self {
            FetchError::Upstream(e) => e.is_outage().then(|| e.is_timeout()),
            FetchError::Read(CopyError::Read { source, .. }) => Some(crate::upstream::io_timed_out(source)),
            // Too slow to keep a slot: as good as a timeout.
            FetchError::Read(CopyError::Sink { source: RelayError::NoProgress { .. }, .. }) => Some(true),
            FetchError::Short { .. } => Some(false),
            _ => None,
        }
    }

    /// What this failure says about whether the upstream has the NAR (it matters only when no
    /// byte reached a client).
    fn attempt(&self) -> Attempt {
        match self {
            FetchError::NotFound => Attempt::Absent,
            FetchError::WrongLength { .. } | FetchError::HashMismatch { .. } => Attempt::Refused,
            e => Attempt::Failed { timed_out: e.outage().unwrap_or(false) },
        }
    }
}

fn outcome(e: FetchError) -> Outcome {
    Err(Arc::new(e))
}

/// Whether a download had to be relayed from memory because the disk refused its bytes.
struct Spilled(bool);

/// What the download thread tells the request that started it: which upstream started
/// sending, or why none will.
type Opened = Result<Arc<str>, Missed>;

/// The sending half of [`Opened`], used once.
struct Opening(Option<mpsc::SyncSender<Opened>>);

impl Opening {
    fn started(&mut self, url: &str) {
        if let Some(tx) = self.0.take() {
            // The request may have gone; nobody else needs to know.
            let _ = tx.send(Ok(Arc::from(trust::origin(url))));
        }
    }

    fn pending(&self) -> bool {
        self.0.is_some()
    }

    fn failed(&mut self, missed: Missed) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Err(missed));
        }
    }
}

struct Job {
    record: NarRecord,
    /// Where the NAR is staged; `None` when the disk takes no new file (then every byte is
    /// relayed from memory, and nothing is kept).
    temp: Option<TempFile>,
    download: Arc<Download>,
    opening: Opening,
    /// An upstream's answer already received (a NAR fetched by name: its length came from it).
    first: Option<(String, NarBody)>,
    /// No narinfo points at it: recorded on its own once verified.
    by_name: bool,
    /// The span to run under, named by the request that started it.
    span: Option<crate::otel::trace::Handoff>,
    /// Another replica downloading it (`replicas`): asked first, and what it sends is not
    /// stored here (it stores it).
    peer: Option<String>,
}

/// How [`Cache::start_download`] went.
enum Started {
    /// It finished just before: the file is here.
    Hit(Body),
    /// Already downloading: this reader follows it.
    Joined(DownloadBody),
    /// A new download: its first reader, and where the thread says how opening went.
    New(DownloadBody, mpsc::Receiver<Opened>),
    Busy,
    /// This client address holds its whole share of the slots; others may still start one.
    HostBusy(String),
}

impl Cache {
    /// Whether this NAR is in the store (one `stat`), so that a request for it needs no
    /// upstream: the HTTP front's choice of worker pool, as [`Cache::holds_narinfo_now`].
    /// With an object store, "no" (its answer would be a network request on the poll loop).
    pub fn holds_nar_now(&self, name: &NarName) -> bool {
        self.blobs.reads_are_local() && matches!(self.blobs.nar_len(name), Ok(Some(_)))
    }

    /// A stored NAR of at most `max` bytes, for the HTTP poll loop to answer without a
    /// worker: never downloads and never waits. `None` when it is not stored or is larger.
    /// With an object store, `None` always: the poll loop never waits for the network (nor,
    /// for the ETag, for a shared index).
    pub fn small_nar_hit(&self, name: &NarName, max: u64) -> Result<Option<(Body, Option<Hash>)>, CacheError> {
        if !self.blobs.reads_are_local() {
            return Ok(None);
        }
        let Some(blob) = self.blobs.nar(name)? else { return Ok(None) };
        if blob.len() > max {
            return Ok(None);
        }
        let tag = match self.blobs.nar_file_hash(&blob) {
            Some(h) => Some(h),
            // Stored without its FileHash (an older ncps, a file system without user xattrs):
            // the ETag is in the index, and a shared index is across the network, which the
            // poll loop never waits for. A worker asks it (`nar`).
            None if self.index.is_shared() => return Ok(None),
            None => self.indexed_file_hash(name, blob.len()),
        };
        self.touch_nar(name);
        Ok(Some((body_of(blob), tag)))
    }

    /// `GET /nar/<name>` (or HEAD, with `head_only`), and the FileHash of the bytes it
    /// answers with, if known: the NAR's ETag (see [`crate::http::range`]). It names the bytes
    /// themselves, so it is the same for a download in progress and for the stored file.
    /// `client` is the address that asked: one address gets a fair share of the download
    /// slots ([`slot_verdict`]), not all of them.
    /// `zstd`: the client accepts `Content-Encoding: zstd` and asked for no range; a stored
    /// plain NAR then goes as its zstd copy once there is one (`zstd_copies`).
    pub fn nar(
        self: &Arc<Self>,
        name: &NarName,
        head_only: bool,
        client: IpAddr,
        zstd: bool,
    ) -> Result<(Answer, Option<Hash>), CacheError> {
        let zstd = zstd && self.settings.zstd_responses && super::zstd_copies::is_plain(name);
        if let Some(url) = self.blobs.nar_redirect(name).filter(|_| !head_only) {
            // One HEAD of the object: a redirect only to what is there (a miss is fetched
            // and verified through ncps, as always).
            if self.blobs.nar_len(name)?.is_some() {
                self.touch_nar(name);
                return Ok((Answer::Redirect(url), None));
            }
        }
        if let Some(blob) = self.blobs.nar(name)? {
            self.touch_nar(name);
            if zstd {
                if let Some(copy) = self.zstd_copy(name)? {
                    return Ok((Answer::HitZstd(body_of(copy)), None));
                }
            }
            let tag = self.stored_file_hash(name, &blob);
            return Ok((Answer::Hit(body_of(blob)), tag));
        }
        if zstd && !head_only {
            // Its copy is made once the download below has stored it.
            self.want_zstd(name);
        }
        let record = match self.index.nar(name)? {
            Some(r) => Some(r),
            None => lock(&self.unindexed).get(name).cloned(),
        };
        let Some(record) = record else {
            return self.nar_by_name(name, head_only, client);
        };
        if record.file_size == 0 {
            // Recorded before empty NARs were refused: no body could be verified, and an
            // empty 200 would look like a complete NAR.
            log::warn!("nar {name}: its narinfo says it is 0 bytes long; no NAR is empty, so it is not served");
            let reason = "its narinfo says FileSize 0: nothing to verify".to_string();
            return Ok((Answer::Unavailable { status: 502, reason }, None));
        }
        let tag = Some(record.file_hash);
        if head_only {
            return Ok((Answer::Length(record.file_size), tag));
        }
        let recorded = || Arc::from(trust::origin(&record.upstream_url));
        let answer = match self.start_download(record.clone(), None, false, client)? {
            Started::Hit(body) => Answer::Hit(body),
            Started::Joined(reader) => Answer::Miss(Body::Growing(Box::new(reader)), recorded()),
            Started::Busy => Answer::Busy,
            Started::HostBusy(reason) => Answer::Unavailable { status: 503, reason },
            // Wait for an upstream to start sending: the head of the answer waits for its
            // first bytes anyway, and a miss that no upstream delivers is then answered with
            // what they said, not a 502 for everything.
            Started::New(reader, opened) => match opened.recv() {
                Ok(Ok(from)) => Answer::Miss(Body::Growing(Box::new(reader)), from),
                Ok(Err(missed)) => missed.answer(),
                // The thread ended without a word (a panic): the reader is told why.
                Err(mpsc::RecvError) => Answer::Miss(Body::Growing(Box::new(reader)), recorded()),
            },
        };
        Ok(tagged(answer, tag))
    }

    /// A NAR no narinfo here points at: fetched by the same name from the configured
    /// upstreams, checked against the hash in its name. A name that is not a content hash
    /// is a 404 without asking anyone; so is a HEAD (it fetches nothing).
    fn nar_by_name(self: &Arc<Self>, name: &NarName, head_only: bool, client: IpAddr) -> Result<(Answer, Option<Hash>), CacheError> {
        let Some(file_hash) = trust::name_hash(name) else {
            log::debug!("nar {name}: no narinfo points at it, and its name is not a content hash");
            return Ok((Answer::NotFound, None));
        };
        Ok(tagged(self.nar_by_name_hash(name, file_hash, head_only, client)?, Some(file_hash)))
    }

    fn nar_by_name_hash(
        self: &Arc<Self>,
        name: &NarName,
        file_hash: Hash,
        head_only: bool,
        client: IpAddr,
    ) -> Result<Answer, CacheError> {
        if head_only {
            log::debug!("nar {name}: no narinfo points at it (a HEAD fetches nothing)");
            return Ok(Answer::NotFound);
        }
        if let Some(d) = lock(&self.downloads.running).get(name) {
            joined(d);
            return Ok(Answer::Miss(Body::Growing(Box::new(d.reader())), Arc::from("")));
        }
        let mut tally = Tally::default();
        for url in self.nar_candidates("", name) {
            let Some(i) = self.metrics.upstream_for_url(&url) else { continue };
            let shown = self.health.shown(i);
            if let Some(skipped) = self.health.skip(i) {
                tally.add(shown, skipped, self.health.why_skipped(i));
                continue;
            }
            let started = Instant::now();
            let body = match self.upstreams.nar(&url, self.settings.deadlines.nar(crate::upstream::UNKNOWN_NAR_SIZE)) {
                Ok(Some(body)) => body,
                Ok(None) => {
                    self.health.succeeded(i);
                    self.metrics.upstream_request(i, Kind::Nar, started.elapsed(), true);
                    tally.add(shown, Attempt::Absent, "not found");
                    continue;
                }
                Err(e) => {
                    log::warn!("nar {name}: {url}: {e}");
                    self.metrics.upstream_request(i, Kind::Nar, started.elapsed(), false);
                    self.metrics.upstream_error_detail(i, &e.to_string());
                    let attempt = self.upstream_failed(i, &e);
                    tally.add(shown, attempt, &e);
                    continue;
                }
            };
            self.health.succeeded(i);
            let Some(len) = body.content_length.filter(|_| !body.decoded) else {
                return self.fetch_whole_by_name(name, file_hash, &url, body, i, started);
            };
            if len == 0 {
                // No NAR is empty: an empty answer cannot be the bytes its name hashes to.
                tally.add(shown, Attempt::Refused, "refused: an empty body");
                continue;
            }
            // Its length is known now: it gets the deadline of that length, not of the largest.
            let body = NarBody { reader: crate::upstream::within(body.reader, self.settings.deadlines.nar(len)), ..body };
            log::info!("nar {name}: no narinfo points at it; fetching it by name from {url} ({len} bytes)");
            // No recorded URL: fetched again by name if it goes, and dropped by a store check
            // that finds it missing (no narinfo needs it).
            let record = NarRecord { name: name.clone(), file_hash, file_size: len, upstream_url: String::new(), stored: false };
            let from = Arc::from(trust::origin(&url));
            return Ok(match self.start_download(record, Some((url, body)), true, client)? {
                Started::Hit(body) => Answer::Hit(body),
                Started::Joined(reader) | Started::New(reader, _) => Answer::Miss(Body::Growing(Box::new(reader)), from),
                Started::Busy => Answer::Busy,
                Started::HostBusy(reason) => Answer::Unavailable { status: 503, reason },
            });
        }
        let missed = tally.missed();
        match missed.verdict {
            Verdict::Absent => log::debug!("nar {name}: no narinfo points at it, and {}", missed.reason),
            Verdict::Unavailable { .. } => log::info!("nar {name}: no narinfo points at it, and {}", missed.reason),
        }
        Ok(missed.answer())
    }

    /// A NAR by name whose length the upstream did not announce (a chunked or
    /// `Content-Encoding: zstd` answer): downloaded whole and checked before anything is sent,
    /// since the response must announce its length. Rare (cache.nixos.org announces lengths),
    /// so not single-flight.
    fn fetch_whole_by_name(
        &self,
        name: &NarName,
        file_hash: Hash,
        url: &str,
        mut body: NarBody,
        i: usize,
        started: Instant,
    ) -> Result<Answer, CacheError> {
        let limit = self.settings.max_size.unwrap_or(u64::MAX);
        // Held whole before it is sent (its length is unknown): with no disk to hold it, it
        // cannot be relayed either, and the client is told why (not a 500).
        let mut temp = match self.staging.temp_file() {
            Ok(t) => t,
            Err(e) if e.is_unwritable() => {
                log::error!("nar {name}: {url}: {e}; a NAR of unknown length cannot be relayed without a disk");
                return Ok(Answer::Unavailable { status: 503, reason: format!("the cache's disk takes no new files: {e}") });
            }
            Err(e) => return Err(e.into()),
        };
        let copied = copy_hashed(&mut body.reader, limit, &mut |_, chunk| {
            self.metrics.upstream_bytes(i, chunk.len() as u64);
            temp.write_all(chunk)
        });
        let failed = |why: String| {
            log::warn!("nar {name}: {url}: {why}; nothing kept");
            self.metrics.upstream_request(i, Kind::Nar, started.elapsed(), false);
            self.metrics.upstream_error_detail(i, &why);
            lock(&self.downloads.failed_urls).insert(url.to_string(), Instant::now());
            Answer::Unavailable { status: 502, reason: format!("{}: {why}", self.health.shown(i)) }
        };
        let (got, len) = match copied {
            Ok(done) => done,
            Err(CopyError::Sink { source, .. }) => return Err(source.into()),
            Err(CopyError::Read { after, source }) => {
                self.health.failed(i, crate::upstream::io_timed_out(&source));
                return Ok(failed(format!("after {after} bytes: {source}")));
            }
            Err(CopyError::TooLong { limit }) => return Ok(failed(format!("longer than --cache-max-size ({limit} bytes)"))),
        };
        if got != file_hash {
            return Ok(failed(format!("its bytes do not hash to its name (got {got})")));
        }
        self.metrics.upstream_request(i, Kind::Nar, started.elapsed(), true);
        self.metrics.nar_fetched(name.as_str(), Some(i), len, started.elapsed(), true);
        let file = temp.reopen()?;
        let record = NarRecord { name: name.clone(), file_hash, file_size: len, upstream_url: String::new(), stored: false };
        match self.keep_nar_by_name(temp, &record) {
            Ok(()) => log::info!("nar {name}: {len} bytes from {url}, fetched by name, verified and stored"),
            Err(e) => log::error!("nar {name}: fetched by name and verified but not kept: {e}"),
        }
        Ok(Answer::Miss(Body::File { file, len }, Arc::from(trust::origin(url))))
    }

    /// Starts (or joins) the download of `record`'s NAR; `first` is an upstream answer already
    /// received for it.
    fn start_download(
        self: &Arc<Self>,
        record: NarRecord,
        first: Option<(String, NarBody)>,
        by_name: bool,
        client: IpAddr,
    ) -> Result<Started, CacheError> {
        let name = &record.name;
        let mut running = lock(&self.downloads.running);
        if let Some(d) = running.get(name) {
            joined(d);
            return Ok(Started::Joined(d.reader()));
        }
        // A download may have finished between the first look and taking the lock.
        if let Some(blob) = self.blobs.nar(name)? {
            return Ok(Started::Hit(body_of(blob)));
        }
        let of_client = running.values().filter(|d| d.started_by == Some(client)).count();
        match slot_verdict(running.len(), of_client, self.settings.max_downloads) {
            Slot::Free => {}
            Slot::PoolFull => {
                log::warn!("nar {name}: {} downloads already running; answered 503", running.len());
                return Ok(Started::Busy);
            }
            Slot::ClientFull(share) => {
                log::warn!(
                    "nar {name}: {client} already runs {of_client} of the {} download slots (its share); answered 503",
                    self.settings.max_downloads
                );
                return Ok(Started::HostBusy(format!(
                    "this client already runs {of_client} downloads, its share of {share}; the rest are kept for others"
                )));
            }
        }
        // Replicas: the lease is taken with `running` held, so a replica that sees it and asks
        // this one for the NAR finds the download (it waits for the lock, then joins).
        let peer = self.download_lease(name);
        if peer.is_none() && self.settings.advertise.is_some() && self.index.nar(name).ok().flatten().is_some_and(|r| r.stored) {
            // Another replica stored it after the look above and gave its lease back.
            if let Some(blob) = self.blobs.nar(name)? {
                self.release_download_lease(name);
                return Ok(Started::Hit(body_of(blob)));
            }
        }
        // A data directory that takes no new files (full, read-only, no permission) degrades
        // as a full disk does: the download is relayed from memory, verified, and not kept.
        let staged = match self.staging.temp_file() {
            Ok(temp) => {
                if record.file_size >= PARALLEL_FROM {
                    temp.reserve(record.file_size);
                }
                temp.reopen().map(|file| (Some(temp), file)).map_err(CacheError::from)
            }
            Err(e) if e.is_unwritable() => {
                log::error!("nar {name}: {e}; relaying it to waiting clients from memory, not keeping it");
                nowhere().map(|file| (None, file))
            }
            Err(e) => Err(e.into()),
        };
        let (temp, file) = match staged {
            Ok(staged) => staged,
            Err(e) => {
                // No download will run: its lease goes back at once.
                self.release_download_lease(name);
                return Err(e);
            }
        };
        let span = crate::otel::trace::handoff();
        let download = Arc::new(
            Download::new(file, record.file_size, self.settings.stall_limit)
                .traced(span.map(|h| h.context))
                .started_by(client),
        );
        running.insert(name.clone(), download.clone());
        self.metrics.download_started();
        drop(running);
        // The first reader registers before the download starts, so a full disk from the
        // first byte still has someone to relay to.
        let first_reader = download.reader();
        let (tx, opened) = mpsc::sync_channel(1);
        let name = name.clone();
        let job = Job { record, temp, download, opening: Opening(Some(tx)), first, by_name, span, peer };
        let cache = Arc::clone(self);
        std::thread::Builder::new()
            .name("download".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let download = job.download.clone();
                let name = job.record.name.clone();
                let run = std::panic::AssertUnwindSafe(|| cache.run_download(job));
                if std::panic::catch_unwind(run).is_err() {
                    log::error!("nar {name}: internal error (panic) during download; nothing kept");
                    cache.release_download_lease(&name);
                    cache.forget_download(&name, &download);
                    download.finish(outcome(FetchError::Internal));
                    cache.metrics.download_finished();
                }
            })
            .map_err(|e| {
                lock(&self.downloads.running).remove(&name);
                self.release_download_lease(&name);
                self.metrics.download_finished();
                CacheError::Thread(e)
            })?;
        Ok(Started::New(first_reader, opened))
    }

    /// The FileHash of a stored NAR: kept with the blob (no index lookup, which would cost a
    /// small-NAR hit ~45% of its rate), else, for blobs stored without it, what the index (or
    /// the list of NARs served but not indexed) records for a NAR of this length.
    fn stored_file_hash(&self, name: &NarName, blob: &crate::storage::Blob) -> Option<Hash> {
        self.blobs.nar_file_hash(blob).or_else(|| self.indexed_file_hash(name, blob.len()))
    }

    fn indexed_file_hash(&self, name: &NarName, len: u64) -> Option<Hash> {
        let record = match self.index.nar(name) {
            Ok(Some(r)) => r,
            Ok(None) => lock(&self.unindexed).get(name).cloned()?,
            Err(e) => {
                log::warn!("nar {name}: no ETag, the index failed: {e}");
                return None;
            }
        };
        (record.file_size == len).then_some(record.file_hash)
    }

    fn run_download(self: &Arc<Self>, job: Job) {
        let Job { record, mut temp, download, mut opening, first, by_name, span, peer } = job;
        let span = crate::otel::trace::span_from(span, "nar download", crate::otel::SpanKind::Internal);
        span.set("ncps.nar", record.name.to_string());
        span.set("ncps.nar.size", record.file_size);
        let name = record.name.clone();
        let started = Instant::now();
        let fetched = self.fetch_nar(&record, &mut temp, &download, &mut opening, first, peer.as_deref());
        let from = fetched.as_ref().ok().and_then(|(url, _)| self.metrics.upstream_for_url(url));
        self.metrics.nar_fetched(name.as_str(), from, record.file_size, started.elapsed(), fetched.is_ok());
        match &fetched {
            Ok((url, _)) => {
                span.set("ncps.upstream", crate::otel::shown_url(trust::origin(url)));
                span.set("url.full", crate::otel::shown_url(url));
                span.set("ncps.verification", "ok");
            }
            Err((e, _)) => {
                span.set("ncps.verification", e.to_string());
                span.fail(e);
            }
        }
        match fetched {
            Ok((url, Spilled(spilled))) if spilled || temp.is_none() => {
                download.finish(Ok(()));
                log::warn!(
                    "nar {name}: {} bytes from {url} verified and served, but not kept: the disk \
                     took no new bytes (see above)",
                    record.file_size
                );
            }
            // All of it from the replica that holds the lease: that one stores it. (If the
            // peer broke off and an upstream sent the rest, `url` says "resumed from" and the
            // NAR is kept here, as its holder may be gone.)
            Ok((url, Spilled(_))) if peer.as_ref().is_some_and(|p| url.starts_with(p.as_str()) && !url.contains(", resumed from ")) => {
                download.finish(Ok(()));
                log::info!(
                    "nar {name}: {} bytes streamed from replica {url} and verified; that replica stores it",
                    record.file_size
                );
            }
            Ok((url, Spilled(_))) => 'kept: {
                download.finish(Ok(()));
                let Some(temp) = temp else { break 'kept };
                let secs = started.elapsed().as_secs_f64();
                if self.settings.max_size.is_some_and(|max| record.file_size > max) {
                    // Readers hold their own handle; dropping the temp file only unlinks it.
                    log::warn!(
                        "nar {name}: {} bytes from {url} verified and served, but not kept: larger \
                         than --cache-max-size",
                        record.file_size
                    );
                } else {
                    let kept = if by_name {
                        self.keep_nar_by_name(temp, &record)
                    } else {
                        self.keep_nar(temp, &name, record.file_size, &record.file_hash)
                    };
                    match kept {
                        Ok(()) => {
                            log::info!(
                                "nar {name}: {} bytes from {url} verified and stored in {secs:.1}s",
                                record.file_size
                            );
                            self.zstd_after_kept(&name);
                        }
                        Err(e) => log::error!("nar {name}: verified but not kept: {e}"),
                    }
                }
            }
            Err((e, tally)) => {
                log::warn!("nar {name}: download failed, nothing kept: {e}");
                // Out of the map first: a client retrying at once must start a new download,
                // not join this dead one and get its error again.
                self.forget_download(&name, &download);
                download.finish(outcome(e));
                if opening.pending() {
                    let missed = tally.missed();
                    if missed.verdict != Verdict::Absent {
                        log::info!("nar {name}: {}", missed.reason);
                    }
                    opening.failed(missed);
                }
            }
        }
        self.release_download_lease(&name);
        self.forget_download(&name, &download);
        self.metrics.download_finished();
    }

    /// Takes a finished download out of the map, unless a newer one for the same NAR has
    /// taken its place.
    fn forget_download(&self, name: &NarName, download: &Arc<Download>) {
        let mut running = lock(&self.downloads.running);
        if running.get(name).is_some_and(|d| Arc::ptr_eq(d, download)) {
            running.remove(name);
        }
    }

    /// Gives a verified NAR its final name and accounts for it.
    fn keep_nar(&self, temp: TempFile, name: &NarName, size: u64, file_hash: &Hash) -> Result<(), CacheError> {
        let span = crate::otel::span("store write", crate::otel::SpanKind::Internal);
        span.set("ncps.store.kind", "nar");
        span.set("ncps.store.bytes", size);
        let _writing = self.writing();
        // A NAR the index says is stored but whose file went (deleted behind ncps's back, then
        // fetched again) is counted already: counting it again would make the evictor remove
        // that much too much, until a restart.
        let counted = self.index.nar(name)?.is_some_and(|r| r.stored);
        self.blobs.put_nar(name, temp, file_hash)?;
        if !self.index.set_nar_stored(name, true)? {
            // Deleted or evicted while downloading: keeping the blob would orphan it.
            self.blobs.remove_nar(name)?;
            return Err(CacheError::EntryRemoved(name.clone()));
        }
        self.space.add(size, if counted { size } else { 0 });
        self.enforce_limit();
        Ok(())
    }

    /// Records a NAR fetched by name (no narinfo points at it) and gives it its final name.
    /// Not kept if the index meanwhile knows that name as other bytes.
    fn keep_nar_by_name(&self, temp: TempFile, record: &NarRecord) -> Result<(), CacheError> {
        {
            let _writing = self.writing();
            match self.index.nar(&record.name)? {
                Some(r) if r.file_hash != record.file_hash || r.file_size != record.file_size => {
                    return Err(CacheError::NameTaken(record.name.clone()));
                }
                Some(_) => {}
                None => {
                    if !self.index.put_nar(record)? {
                        return Err(CacheError::NameTaken(record.name.clone()));
                    }
                }
            }
        }
        self.keep_nar(temp, &record.name, record.file_size, &record.file_hash)
    }

    /// Where to try, per [`sources::nar_candidates`]: only configured upstreams, the recorded
    /// URL first if it is on one of them.
    fn nar_candidates(&self, recorded: &str, name: &NarName) -> Vec<String> {
        let mut failed = lock(&self.downloads.failed_urls);
        failed.retain(|_, t| t.elapsed() < FAILED_URL_MEMORY);
        let bases: Vec<&str> = self.upstreams.list().iter().map(|u| u.url.as_str()).collect();
        sources::nar_candidates(recorded, name, &bases, &|u| failed.contains_key(u))
    }

    /// Downloads into `temp`, hashing as it goes. Returns the URL that delivered, and whether
    /// the disk refused bytes on the way; or the last error and what each upstream said.
    /// Upstreams marked down are skipped; `first` is an answer already received.
    fn fetch_nar(
        &self,
        record: &NarRecord,
        temp: &mut Option<TempFile>,
        download: &Download,
        opening: &mut Opening,
        mut first: Option<(String, NarBody)>,
        peer: Option<&str>,
    ) -> Result<(String, Spilled), (FetchError, Tally)> {
        let mut last_error = FetchError::Nowhere;
        let mut tally = Tally::default();
        let mut candidates = self.nar_candidates(&record.upstream_url, &record.name);
        let from_replica = peer.map(|p| format!("{p}/nar/{}", record.name));
        if let Some(u) = &from_replica {
            // The replica downloading it relays its download; the bytes are verified here
            // against the same FileHash as from any upstream.
            candidates.insert(0, u.clone());
        }
        if let Some((url, _)) = &first {
            candidates.retain(|u| u != url);
            candidates.insert(0, url.clone());
        }
        for (k, url) in candidates.iter().enumerate() {
            let upstream = self.metrics.upstream_for_url(url);
            let shown = upstream.map_or("?", |i| self.health.shown(i));
            let opened = first.take().filter(|(u, _)| u == url).map(|(_, body)| body);
            if let (Some(i), None) = (upstream, &opened) {
                if let Some(skipped) = self.health.skip(i) {
                    tally.add(shown, skipped, self.health.why_skipped(i));
                    continue;
                }
            }
            let started = Instant::now();
            let span = crate::otel::span("upstream nar", crate::otel::SpanKind::Client);
            span.set("ncps.upstream", crate::otel::shown_url(trust::origin(url)));
            span.set("url.full", crate::otel::shown_url(url));
            let replica = from_replica.as_deref() == Some(url.as_str());
            let attempt = Attempted { url, upstream, replica, started, resume: resume_order(&candidates, k) };
            let (result, by) = self.fetch_nar_from(attempt, opened, record, temp, download, opening);
            match &result {
                Ok(_) => span.set("ncps.bytes", record.file_size),
                Err((e, written)) => {
                    span.set("ncps.bytes", *written);
                    span.set("ncps.sources", crate::otel::shown_url(&by.sources));
                    span.fail(e);
                }
            }
            // What is reported is about the upstream that sent last (a resume may have moved on).
            if let Some(i) = by.upstream {
                self.metrics.upstream_request(i, Kind::Nar, by.started.elapsed(), result.is_ok());
                match &result {
                    Err((e, _)) => {
                        self.metrics.upstream_error_detail(i, &e.to_string());
                        match e.outage() {
                            Some(timed_out) => self.health.failed(i, timed_out),
                            None => self.health.succeeded(i),
                        }
                    }
                    Ok(_) => self.health.succeeded(i),
                }
            }
            match result {
                Ok(spilled) => return Ok((by.sources, spilled)),
                Err((e, written)) => {
                    log::warn!("nar {}: {}: {e}", record.name, by.sources);
                    // A spliced file that does not verify: which source was wrong is unknown.
                    let mut failed = lock(&self.downloads.failed_urls);
                    for u in by.used {
                        failed.insert(u, Instant::now());
                    }
                    drop(failed);
                    tally.add(shown, e.attempt(), &e);
                    last_error = e;
                    // Readers may already have bytes from this attempt, and nobody could send
                    // the rest (see resume.rs): starting over elsewhere would splice a second
                    // copy onto the first part of the response.
                    if written > 0 {
                        break;
                    }
                }
            }
        }
        Err((last_error, tally))
    }

    /// One attempt, starting at `attempt.url` (and resumed from others if its body breaks
    /// off); returns also who sent the bytes.
    fn fetch_nar_from(
        &self,
        attempt: Attempted<'_>,
        opened: Option<NarBody>,
        record: &NarRecord,
        temp: &mut Option<TempFile>,
        download: &Download,
        opening: &mut Opening,
    ) -> (Result<Spilled, (FetchError, u64)>, SentBy) {
        let Attempted { url, upstream, replica, started, resume } = attempt;
        let sent_by = |s: &Resuming<'_>| SentBy {
            sources: s.sources(),
            upstream: s.upstream,
            started: s.started,
            used: s.used.clone(),
        };
        let alone = || SentBy { sources: url.to_string(), upstream, started, used: vec![url.to_string()] };
        let deadlines = &self.settings.deadlines;
        let deadline = deadlines.nar(record.file_size);
        let open = || match replica {
            true => self.upstreams.nar_from_replica(url, deadline, self.settings.peer_token.as_ref()),
            false => self.upstreams.nar(url, deadline),
        };
        let body = match opened.map_or_else(open, |b| Ok(Some(b))) {
            Ok(Some(b)) => b,
            Ok(None) => return (Err((FetchError::NotFound, 0)), alone()),
            Err(e) => return (Err((FetchError::Upstream(e), 0)), alone()),
        };
        if let Some(len) = body.content_length.filter(|_| !body.decoded) {
            if len != record.file_size {
                let e = FetchError::WrongLength { announced: len, expected: record.file_size };
                return (Err((e, 0)), alone());
            }
        }
        opening.started(url);
        let resumable = !body.decoded;
        let until = started + deadline;
        let mut reader = Resuming::new(
            self,
            &record.name,
            download,
            body.reader,
            record.file_size,
            resumable,
            url,
            upstream,
            resume,
            until,
        );
        let mut spilled = temp.is_none();
        let mut written = 0u64;
        // Bytes since the start of the current window: a download nobody waits for must make
        // real progress to keep its slot (see `Deadlines::progressing`).
        let mut window = (Instant::now(), 0u64);
        let copy = if record.file_size >= PARALLEL_FROM { copy_hashed_parallel } else { copy_hashed };
        let copied = copy(&mut reader, record.file_size, &mut |at, chunk| {
            if let (false, Some(t)) = (spilled, temp.as_mut()) {
                if let Err(e) = t.write_all(chunk) {
                    log::error!(
                        "nar {}: {e}; relaying the rest to waiting clients from memory, not keeping it",
                        record.name
                    );
                    spilled = true;
                }
            }
            written = at + chunk.len() as u64;
            let span = window.0.elapsed();
            if span >= PROGRESS_WINDOW {
                let got = written - window.1;
                if !download.has_readers() && !deadlines.progressing(got, span) {
                    return Err(RelayError::NoProgress { bytes: got, window: span });
                }
                window = (Instant::now(), written);
            }
            if spilled {
                download.spill(chunk)
            } else {
                download.progress(written);
                Ok(())
            }
        });
        let by = sent_by(&reader);
        let checked = match copied {
            Err(e) => Err((FetchError::Read(e), written)),
            Ok((_, len)) if len != record.file_size => {
                Err((FetchError::Short { got: len, expected: record.file_size }, written))
            }
            Ok((got, _)) if got != record.file_hash => {
                Err((FetchError::HashMismatch { got, expected: record.file_hash }, written))
            }
            Ok(_) => Ok(Spilled(spilled)),
        };
        (checked, by)
    }
}

/// Where one attempt at a NAR starts, and where its rest can come from.
struct Attempted<'a> {
    url: &'a str,
    upstream: Option<usize>,
    /// Whether `url` is another replica's (sent `--cache-get-token`, not upstream credentials).
    replica: bool,
    started: Instant,
    resume: std::collections::VecDeque<String>,
}

/// Who sent the bytes of an attempt: every URL in order, and the last one's upstream.
struct SentBy {
    /// For the log: "A" or "A, resumed from B".
    sources: String,
    upstream: Option<usize>,
    started: Instant,
    used: Vec<String>,
}

/// A request joins a download in flight: its span links to the download's.
fn joined(d: &Download) {
    if let Some(c) = d.span {
        crate::otel::link(c);
        crate::otel::attr("ncps.download.joined", true);
    }
}

/// The ETag goes only with an answer that carries the NAR's bytes (or their length).
fn tagged(answer: Answer, tag: Option<Hash>) -> (Answer, Option<Hash>) {
    match answer {
        Answer::Hit(_) | Answer::Miss(..) | Answer::Length(_) => (answer, tag),
        other => (other, None),
    }
}

#[cfg(test)]
mod tests {
    use super::{slot_verdict, Slot};

    #[test]
    fn one_client_may_hold_all_but_a_quarter_of_the_download_slots() {
        // 16 slots: a host may run 12, the other 4 stay for everyone else.
        assert_eq!(slot_verdict(11, 11, 16), Slot::Free);
        assert_eq!(slot_verdict(12, 12, 16), Slot::ClientFull(12));
        // Another host still starts one while the busy host holds its share.
        assert_eq!(slot_verdict(12, 0, 16), Slot::Free);
        assert_eq!(slot_verdict(16, 0, 16), Slot::PoolFull);
    }

    #[test]
    fn a_pool_under_four_slots_keeps_no_reserve() {
        assert_eq!(slot_verdict(2, 2, 3), Slot::Free);
        assert_eq!(slot_verdict(3, 3, 3), Slot::PoolFull);
        assert_eq!(slot_verdict(0, 0, 1), Slot::Free);
    }
}
