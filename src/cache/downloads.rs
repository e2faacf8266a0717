//! NAR hits, and NAR misses as single-flight downloads: one thread per NAR in flight writes a
//! staged file while every client, arriving before or during the download, follows it as it
//! grows. Bytes are hashed as they stream ([`super::verify`]); the NAR gets its final name only
//! once its size and hash match the narinfo.

use super::flight::{Download, Outcome, RelayError};
use super::narinfos::body_of;
use super::verify::{copy_hashed, CopyError};
use super::{lock, sources, trust, Answer, Cache, CacheError};
use crate::http::Body;
use crate::index::NarRecord;
use crate::metrics::Kind;
use crate::nix::{Hash, NarName};
use crate::storage::TempFile;
use crate::upstream::UpstreamError;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a URL that failed stays at the back of the line.
const FAILED_URL_MEMORY: Duration = Duration::from_secs(300);

pub(super) struct State {
    running: Mutex<HashMap<NarName, Arc<Download>>>,
    /// Upstream NAR URLs that failed recently, tried last next time.
    failed_urls: Mutex<HashMap<String, Instant>>,
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

fn outcome(e: FetchError) -> Outcome {
    Err(Arc::new(e))
}

/// Whether a download had to be relayed from memory because the disk refused its bytes.
struct Spilled(bool);

struct Job {
    record: NarRecord,
    temp: TempFile,
    download: Arc<Download>,
}

impl Cache {
    /// `GET /nar/<name>` (or HEAD, with `head_only`), and the FileHash of the bytes it
    /// answers with, if known: the NAR's ETag (see [`crate::http::range`]). It names the bytes
    /// themselves, so it is the same for a download in progress and for the stored file.
    pub fn nar(self: &Arc<Self>, name: &NarName, head_only: bool) -> Result<(Answer, Option<Hash>), CacheError> {
        if let Some(blob) = self.blobs.nar(name)? {
            self.touch_nar(name);
            let tag = self.stored_file_hash(name, &blob);
            return Ok((Answer::Hit(body_of(blob)), tag));
        }
        let record = match self.index.nar(name)? {
            Some(r) => Some(r),
            None => lock(&self.unindexed).get(name).cloned(),
        };
        let Some(record) = record else {
            log::debug!("nar {name}: no narinfo points at it");
            return Ok((Answer::NotFound, None));
        };
        let tag = Some(record.file_hash);
        if head_only {
            return Ok((Answer::Length(record.file_size), tag));
        }
        let mut running = lock(&self.downloads.running);
        if let Some(d) = running.get(name) {
            let from = Arc::from(trust::origin(&record.upstream_url));
            return Ok((Answer::Miss(Body::Growing(Box::new(d.reader())), from), tag));
        }
        // A download may have finished between the first look and taking the lock.
        if let Some(blob) = self.blobs.nar(name)? {
            let tag = self.stored_file_hash(name, &blob);
            return Ok((Answer::Hit(body_of(blob)), tag));
        }
        if running.len() >= self.settings.max_downloads {
            log::warn!("nar {name}: {} downloads already running; answered 503", running.len());
            return Ok((Answer::Busy, None));
        }
        let temp = self.staging.temp_file()?;
        let download = Arc::new(Download::new(temp.reopen()?, record.file_size, self.settings.stall_limit));
        running.insert(name.clone(), download.clone());
        self.metrics.download_started();
        drop(running);
        // The first reader registers before the download starts, so a full disk from the
        // first byte still has someone to relay to.
        let first = download.reader();
        let from = Arc::from(trust::origin(&record.upstream_url));
        let job = Job { record, temp, download };
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
                    cache.forget_download(&name, &download);
                    download.finish(outcome(FetchError::Internal));
                    cache.metrics.download_finished();
                }
            })
            .map_err(|e| {
                lock(&self.downloads.running).remove(name);
                self.metrics.download_finished();
                CacheError::Thread(e)
            })?;
        Ok((Answer::Miss(Body::Growing(Box::new(first)), from), tag))
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

    fn run_download(&self, job: Job) {
        let Job { record, mut temp, download } = job;
        let name = record.name.clone();
        let started = Instant::now();
        match self.fetch_nar(&record, &mut temp, &download) {
            Ok((url, Spilled(true))) => {
                download.finish(Ok(()));
                log::warn!(
                    "nar {name}: {} bytes from {url} verified and served, but not kept: the disk \
                     was full (see above)",
                    record.file_size
                );
            }
            Ok((url, Spilled(false))) => {
                download.finish(Ok(()));
                let secs = started.elapsed().as_secs_f64();
                if self.settings.max_size.is_some_and(|max| record.file_size > max) {
                    // Readers hold their own handle; dropping the temp file only unlinks it.
                    log::warn!(
                        "nar {name}: {} bytes from {url} verified and served, but not kept: larger \
                         than --cache-max-size",
                        record.file_size
                    );
                } else {
                    match self.keep_nar(temp, &name, record.file_size, &record.file_hash) {
                        Ok(()) => log::info!(
                            "nar {name}: {} bytes from {url} verified and stored in {secs:.1}s",
                            record.file_size
                        ),
                        Err(e) => log::error!("nar {name}: verified but not kept: {e}"),
                    }
                }
            }
            Err(e) => {
                log::warn!("nar {name}: download failed, nothing kept: {e}");
                // Out of the map first: a client retrying at once must start a new download,
                // not join this dead one and get its error again.
                self.forget_download(&name, &download);
                download.finish(outcome(e));
            }
        }
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
        let _writing = self.writing();
        self.blobs.put_nar(name, temp, file_hash)?;
        if !self.index.set_nar_stored(name, true)? {
            // Deleted or evicted while downloading: keeping the blob would orphan it.
            self.blobs.remove_nar(name)?;
            return Err(CacheError::EntryRemoved(name.clone()));
        }
        self.space.add(size, 0);
        self.enforce_limit();
        Ok(())
    }

    /// Where to try, per [`sources::nar_candidates`].
    fn nar_candidates(&self, record: &NarRecord) -> Vec<String> {
        let mut failed = lock(&self.downloads.failed_urls);
        failed.retain(|_, t| t.elapsed() < FAILED_URL_MEMORY);
        let bases: Vec<&str> = self.upstreams.list().iter().map(|u| u.url.as_str()).collect();
        sources::nar_candidates(&record.upstream_url, &record.name, &bases, &|u| failed.contains_key(u))
    }

    /// Downloads into `temp`, hashing as it goes. Returns the URL that delivered, and whether
    /// the disk refused bytes on the way.
    fn fetch_nar(
        &self,
        record: &NarRecord,
        temp: &mut TempFile,
        download: &Download,
    ) -> Result<(String, Spilled), FetchError> {
        let mut last_error = FetchError::Nowhere;
        for url in self.nar_candidates(record) {
            let upstream = self.metrics.upstream_for_url(&url);
            let started = Instant::now();
            let result = self.fetch_nar_from(&url, record, temp, download, upstream);
            if let Some(i) = upstream {
                self.metrics.upstream_request(i, Kind::Nar, started.elapsed(), result.is_ok());
                if let Err((e, _)) = &result {
                    self.metrics.upstream_error_detail(i, &e.to_string());
                }
            }
            match result {
                Ok(spilled) => return Ok((url, spilled)),
                Err((e, written)) => {
                    log::warn!("nar {}: {url}: {e}", record.name);
                    lock(&self.downloads.failed_urls).insert(url, Instant::now());
                    last_error = e;
                    // Readers may already have bytes from this attempt; starting over from
                    // another upstream would splice two sources into one response.
                    if written > 0 {
                        break;
                    }
                }
            }
        }
        Err(last_error)
    }

    fn fetch_nar_from(
        &self,
        url: &str,
        record: &NarRecord,
        temp: &mut TempFile,
        download: &Download,
        upstream: Option<usize>,
    ) -> Result<Spilled, (FetchError, u64)> {
        let body = match self.upstreams.nar(url) {
            Ok(Some(b)) => b,
            Ok(None) => return Err((FetchError::NotFound, 0)),
            Err(e) => return Err((FetchError::Upstream(e), 0)),
        };
        if let Some(len) = body.content_length.filter(|_| !body.decoded) {
            if len != record.file_size {
                return Err((FetchError::WrongLength { announced: len, expected: record.file_size }, 0));
            }
        }
        let mut reader = body.reader;
        let mut spilled = false;
        let mut written = 0u64;
        let copied = copy_hashed(&mut reader, record.file_size, &mut |at, chunk| {
            if let Some(i) = upstream {
                self.metrics.upstream_bytes(i, chunk.len() as u64);
            }
            if !spilled {
                if let Err(e) = temp.write_all(chunk) {
                    log::error!(
                        "nar {}: {e}; relaying the rest to waiting clients from memory, not keeping it",
                        record.name
                    );
                    spilled = true;
                }
            }
            written = at + chunk.len() as u64;
            if spilled {
                download.spill(chunk)
            } else {
                download.progress(written);
                Ok(())
            }
        });
        let (got, len) = copied.map_err(|e| (FetchError::Read(e), written))?;
        if len != record.file_size {
            return Err((FetchError::Short { got: len, expected: record.file_size }, written));
        }
        if got != record.file_hash {
            return Err((FetchError::HashMismatch { got, expected: record.file_hash }, written));
        }
        Ok(Spilled(spilled))
    }
}
