//! The cache core: hits from disk, misses from upstream, each miss fetched once.
//!
//! The rules that make ncps safe to put between a LAN and the internet live here:
//! - a narinfo is stored and signed only if an upstream signature verifies against a trusted
//!   key (with no keys configured it is passed on unsigned by ncps);
//! - a NAR is stored only if its size and SHA-256 match what its narinfo promised;
//! - nothing appears under its final name until it is complete and checked.

use crate::config::Config;
use crate::db::{self, Db, NarRecord};
use crate::flight::{Download, SingleFlight};
use crate::http::Body;
use crate::memo::Memo;
use crate::metrics::{Kind, Metrics, StoreStats};
use crate::nix::hash::Hasher;
use crate::nix::{NarInfo, NarName, PublicKey, SecretKey, StorePathHash};
use crate::store::Store;
use crate::upstream::Upstreams;
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An answer from the cache, for the HTTP front to send.
pub enum Answer {
    /// Served from disk.
    Hit(Body),
    /// Fetched (or being fetched) from upstream: the body and where it comes from, for the log.
    Miss(Body, Arc<str>),
    /// Only the length is known (a HEAD for a NAR not fetched yet).
    Length(u64),
    NotFound,
    /// Too many downloads at once: try again shortly.
    Busy,
}

/// An internal failure (disk, database): the client gets a 500, the log gets this.
#[derive(Debug)]
pub struct CacheError(pub String);

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CacheError {}

impl From<std::io::Error> for CacheError {
    fn from(e: std::io::Error) -> Self {
        CacheError(e.to_string())
    }
}

impl From<db::DbError> for CacheError {
    fn from(e: db::DbError) -> Self {
        CacheError(e.to_string())
    }
}

/// Memory for recently served narinfos (a few thousand typical ones).
const MEMO_BUDGET: usize = 4 << 20;
/// Larger narinfos (thousands of references) are served from their file.
const MEMO_ENTRY_MAX: u64 = 16 * 1024;

/// How long a narinfo whose NAR has not been fetched is safe from eviction: the time a client
/// may take between reading a narinfo and asking for its NAR.
const PENDING_GRACE_SECS: i64 = 600;

/// What a narinfo miss produced, shared by everyone who asked at the same time.
/// The narinfo ncps serves and the upstream it came from, `None` when no upstream has it.
type NarinfoResult = Result<Option<(Arc<str>, Arc<Vec<u8>>)>, String>;

pub struct Cache {
    store: Store,
    db: Db,
    upstreams: Upstreams,
    trusted: Vec<PublicKey>,
    key: SecretKey,
    sign: bool,
    negative_ttl: Duration,
    stall_limit: Duration,
    /// Downloads run on their own threads and outlive the request that started them (the
    /// bytes are wanted by the cache even if that client left), so the worker pool does not
    /// bound them: this does.
    max_downloads: usize,
    narinfo_flights: SingleFlight<StorePathHash, NarinfoResult>,
    downloads: Mutex<HashMap<NarName, Arc<Download>>>,
    /// Upstream NAR URLs that failed recently, tried last next time.
    failed_urls: Mutex<HashMap<String, Instant>>,
    negative: Mutex<HashMap<StorePathHash, Instant>>,
    touched: Mutex<Touched>,
    max_size: Option<u64>,
    /// Bytes the store holds (NAR files once each, plus narinfos), kept in step with the index.
    usage: AtomicU64,
    /// One eviction pass at a time.
    evicting: Mutex<()>,
    /// NARs of narinfos that were served but could not be indexed (a full disk).
    unindexed: Mutex<HashMap<NarName, NarRecord>>,
    metrics: Arc<Metrics>,
    /// Recently served narinfos, so a hit needs no file system call.
    memo: Mutex<Memo>,
}

/// Why an upload was refused.
#[derive(Debug)]
pub enum UploadError {
    /// The client sent something wrong (400), with the reason.
    Bad(String),
    /// Larger than the whole cache may be (413).
    TooLarge(u64),
    Internal(CacheError),
}

impl fmt::Display for UploadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UploadError::Bad(why) => f.write_str(why),
            UploadError::TooLarge(n) => write!(f, "{n} bytes is more than --cache-max-size allows"),
            UploadError::Internal(e) => write!(f, "{e}"),
        }
    }
}

impl<E: Into<CacheError>> From<E> for UploadError {
    fn from(e: E) -> Self {
        UploadError::Internal(e.into())
    }
}

/// What an eviction pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    pub narinfos: u64,
    pub nars: u64,
    pub bytes: u64,
}

#[derive(Default)]
struct Touched {
    narinfos: HashMap<StorePathHash, i64>,
    nars: HashMap<NarName, i64>,
}

impl Cache {
    pub fn new(config: &Config, store: Store, db: Db, key: SecretKey) -> Cache {
        Cache {
            store,
            db,
            upstreams: Upstreams::new(config),
            trusted: config.upstream_keys.clone(),
            key,
            sign: config.sign_narinfo,
            negative_ttl: config.negative_ttl,
            stall_limit: config.body_idle_timeout * 2,
            max_downloads: config.workers.max(4),
            narinfo_flights: SingleFlight::new(),
            downloads: Mutex::new(HashMap::new()),
            failed_urls: Mutex::new(HashMap::new()),
            negative: Mutex::new(HashMap::new()),
            touched: Mutex::new(Touched::default()),
            max_size: config.max_size,
            usage: AtomicU64::new(0),
            evicting: Mutex::new(()),
            unindexed: Mutex::new(HashMap::new()),
            memo: Mutex::new(Memo::new(MEMO_BUDGET, Duration::from_secs(60))),
            metrics: Arc::new(Metrics::new(&config.upstreams.iter().map(|u| u.url.clone()).collect::<Vec<_>>())),
        }
    }

    /// Figures about the store, for metrics and the status page.
    pub fn figures(&self) -> Result<StoreStats, CacheError> {
        let (narinfo_count, nar_count) = self.db.counts()?;
        Ok(StoreStats {
            size_bytes: self.usage.load(Ordering::Relaxed),
            narinfo_count,
            nar_count,
            max_size: self.max_size,
        })
    }

    /// Whether the store and the index can be used right now (`/healthz`).
    pub fn health(&self) -> Result<(), CacheError> {
        self.db.counts()?;
        // A temp file proves the disk takes new files (it is removed at once).
        drop(self.store.temp_file()?);
        Ok(())
    }

    fn add_usage(&self, added: u64, removed: u64) {
        if added >= removed {
            self.usage.fetch_add(added - removed, Ordering::Relaxed);
        } else {
            let _ = self.usage.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(removed - added))
            });
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// The narinfo if it is here (a hit), without ever asking upstream.
    pub fn narinfo_hit(&self, hash: &StorePathHash) -> Result<Option<Body>, CacheError> {
        if let Some(bytes) = lock(&self.memo).get(hash) {
            lock(&self.touched).narinfos.insert(*hash, db::now());
            return Ok(Some(Body::Bytes(bytes.to_vec())));
        }
        let Some((file, len)) = Store::open_existing(&self.store.narinfo_path(hash))? else {
            return Ok(None);
        };
        lock(&self.touched).narinfos.insert(*hash, db::now());
        if len > MEMO_ENTRY_MAX {
            return Ok(Some(Body::File { file, len }));
        }
        let mut bytes = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0)?;
        lock(&self.memo).insert(*hash, Arc::from(&bytes[..]));
        Ok(Some(Body::Bytes(bytes)))
    }

    /// `GET /<hash>.narinfo`.
    pub fn narinfo(&self, hash: &StorePathHash) -> Result<Answer, CacheError> {
        if let Some(body) = self.narinfo_hit(hash)? {
            return Ok(Answer::Hit(body));
        }
        if self.is_known_missing(hash) {
            return Ok(Answer::NotFound);
        }
        let (result, _) = self.narinfo_flights.run(*hash, || self.fetch_narinfo(hash));
        match result {
            Ok(Some((from, bytes))) => Ok(Answer::Miss(Body::Bytes(bytes.to_vec()), from)),
            Ok(None) => Ok(Answer::NotFound),
            Err(e) => Err(CacheError(e)),
        }
    }

    /// `GET /upload/<hash>.narinfo`: the local cache only. A client about to upload asks
    /// whether the path is here; asking upstream for a path only it has built is wasted time.
    pub fn narinfo_local(&self, hash: &StorePathHash) -> Result<Answer, CacheError> {
        Ok(self.narinfo_hit(hash)?.map_or(Answer::NotFound, Answer::Hit))
    }

    fn is_known_missing(&self, hash: &StorePathHash) -> bool {
        let mut negative = lock(&self.negative);
        match negative.get(hash) {
            Some(t) if t.elapsed() < self.negative_ttl => true,
            Some(_) => {
                negative.remove(hash);
                false
            }
            None => false,
        }
    }

    fn remember_missing(&self, hash: &StorePathHash) {
        if self.negative_ttl.is_zero() {
            return;
        }
        let mut negative = lock(&self.negative);
        // Bounded: a flood of lookups for random hashes must not grow memory without limit.
        if negative.len() >= 100_000 {
            let ttl = self.negative_ttl;
            negative.retain(|_, t| t.elapsed() < ttl);
            if negative.len() >= 100_000 {
                negative.clear();
            }
        }
        negative.insert(*hash, Instant::now());
    }

    /// Forgets that `hash` was missing (an upload or a new upstream can make it exist).
    pub fn forget_missing(&self, hash: &StorePathHash) {
        lock(&self.negative).remove(hash);
    }

    fn fetch_narinfo(&self, hash: &StorePathHash) -> NarinfoResult {
        let mut any_error = false;
        for (i, upstream) in self.upstreams.list().iter().enumerate() {
            let started = Instant::now();
            let result = self.upstreams.narinfo(upstream, hash);
            self.metrics.upstream_request(i, Kind::Narinfo, started.elapsed(), result.is_ok());
            let bytes = match result {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) => {
                    log::warn!("upstream {}: narinfo {hash}: {e}; trying the next", upstream.url);
                    self.metrics.upstream_error_detail(i, &e.to_string());
                    any_error = true;
                    continue;
                }
            };
            self.metrics.upstream_bytes(i, bytes.len() as u64);
            match self.accept_narinfo(&upstream.url, hash, &bytes) {
                Ok(served) => {
                    log::info!("narinfo {hash}: from {} in {:.1}ms", upstream.url, started.elapsed().as_secs_f64() * 1000.0);
                    return Ok(Some((Arc::from(upstream.url.as_str()), Arc::new(served))));
                }
                Err(why) => {
                    log::warn!("upstream {}: narinfo {hash} refused: {why}; trying the next", upstream.url);
                    any_error = true;
                }
            }
        }
        // Only a clean "no" from every upstream is remembered: an upstream that failed may
        // have it a moment later.
        if !any_error {
            self.remember_missing(hash);
        }
        Ok(None)
    }

    /// Checks an upstream narinfo, records it and stores the version ncps serves. `Err` says
    /// why the upstream's answer cannot be trusted.
    fn accept_narinfo(&self, base: &str, hash: &StorePathHash, bytes: &[u8]) -> Result<Vec<u8>, String> {
        let mut info = NarInfo::parse(bytes).map_err(|e| e.to_string())?;
        if info.store_path_hash() != Some(*hash) {
            return Err(format!("it describes {}, not {hash}", info.store_path));
        }
        let verified = info.verify(&self.trusted);
        if !self.trusted.is_empty() && !verified {
            return Err("no signature by a trusted upstream key".into());
        }
        let (file_hash, file_size) = info.file_digest()?;
        let (name, upstream_url) = nar_location(base, &info.url, &file_hash, &info.compression)?;
        info.url = format!("nar/{name}");
        if self.sign && verified {
            info.sign(&self.key);
        }
        let record = NarRecord { name, file_hash, file_size, upstream_url, stored: false };
        match self.store_narinfo(hash, &info, &record) {
            Ok(served) => Ok(served),
            Err(e) => {
                // A full disk must not turn a verified answer into an error: serve it, keep
                // nothing, and remember where its NAR is so that can be served too.
                log::error!("narinfo {hash}: verified but not kept: {e}");
                let mut unindexed = lock(&self.unindexed);
                if unindexed.len() >= 10_000 {
                    unindexed.clear();
                }
                unindexed.insert(record.name.clone(), record);
                Ok(info.to_string().into_bytes())
            }
        }
    }

    /// Indexes and writes the narinfo ncps serves; returns its bytes.
    fn store_narinfo(&self, hash: &StorePathHash, info: &NarInfo, record: &NarRecord) -> Result<Vec<u8>, CacheError> {
        let served = info.to_string().into_bytes();
        // Index first, file second: a crash between the two leaves an index entry without a
        // file, which start-up drops, never a served narinfo whose NAR nobody can find.
        let replaced = self.db.put_narinfo(hash, &info.store_path, record, served.len() as u64)?;
        if let Err(e) = self.store.write_atomic(&self.store.narinfo_path(hash), &served) {
            // The index may take a row when the disk has no room for the file (a full disk
            // with space left in the database's pages): a row this call added goes again, so
            // the next request is a clean miss. Only the row: its NAR (an upload's, say) may
            // be stored and wanted. A row that was there before keeps its file, if any.
            if replaced == 0 {
                if let Err(e2) = self.db.delete_narinfo(hash) {
                    log::warn!("narinfo {hash}: its index row stays until the next start-up check: {e2}");
                }
            }
            return Err(e.into());
        }
        lock(&self.memo).insert(*hash, Arc::from(&served[..]));
        self.add_usage(served.len() as u64, replaced);
        self.enforce_limit();
        Ok(served)
    }

    /// `GET /nar/<name>` (or HEAD, with `head_only`).
    pub fn nar(self: &Arc<Self>, name: &NarName, head_only: bool) -> Result<Answer, CacheError> {
        let path = self.store.nar_path(name);
        if let Some((file, len)) = Store::open_existing(&path)? {
            lock(&self.touched).nars.insert(name.clone(), db::now());
            return Ok(Answer::Hit(Body::File { file, len }));
        }
        let record = match self.db.nar(name)? {
            Some(r) => Some(r),
            None => lock(&self.unindexed).get(name).cloned(),
        };
        let Some(record) = record else {
            log::debug!("nar {name}: no narinfo points at it");
            return Ok(Answer::NotFound);
        };
        if head_only {
            return Ok(Answer::Length(record.file_size));
        }
        let mut downloads = lock(&self.downloads);
        if let Some(d) = downloads.get(name) {
            return Ok(Answer::Miss(Body::Growing(Box::new(d.reader())), Arc::from(origin(&record.upstream_url))));
        }
        // A download may have finished between the first look and taking the lock.
        if let Some((file, len)) = Store::open_existing(&path)? {
            return Ok(Answer::Hit(Body::File { file, len }));
        }
        if downloads.len() >= self.max_downloads {
            log::warn!("nar {name}: {} downloads already running; answered 503", downloads.len());
            return Ok(Answer::Busy);
        }
        let temp = self.store.temp_file()?;
        let download = Arc::new(Download::new(temp.reopen()?, record.file_size, self.stall_limit));
        downloads.insert(name.clone(), download.clone());
        self.metrics.download_started();
        drop(downloads);
        // The first reader registers before the download starts, so a full disk from the
        // first byte still has someone to relay to.
        let first = download.reader();
        let from = Arc::from(origin(&record.upstream_url));
        let job = DownloadJob { record, temp, download };
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
                    download.finish(Err("internal error".into()));
                    cache.metrics.download_finished();
                }
            })
            .map_err(|e| {
                lock(&self.downloads).remove(name);
                self.metrics.download_finished();
                CacheError(format!("starting download thread: {e}"))
            })?;
        Ok(Answer::Miss(Body::Growing(Box::new(first)), from))
    }

    fn run_download(&self, job: DownloadJob) {
        let DownloadJob { record, mut temp, download } = job;
        let name = record.name.clone();
        let started = Instant::now();
        let result = self.fetch_nar(&record, &mut temp, &download);
        match result {
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
                if self.max_size.is_some_and(|max| record.file_size > max) {
                    // Readers hold their own handle; dropping the temp file only unlinks it.
                    log::warn!(
                        "nar {name}: {} bytes from {url} verified and served, but not kept: larger \
                         than --cache-max-size",
                        record.file_size
                    );
                } else {
                    match self.keep_nar(temp, &name, record.file_size) {
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
                download.finish(Err(e));
            }
        }
        self.forget_download(&name, &download);
        self.metrics.download_finished();
    }

    /// Takes a finished download out of the map, unless a newer one for the same NAR has
    /// taken its place.
    fn forget_download(&self, name: &NarName, download: &Arc<Download>) {
        let mut downloads = lock(&self.downloads);
        if downloads.get(name).is_some_and(|d| Arc::ptr_eq(d, download)) {
            downloads.remove(name);
        }
    }

    /// Moves a verified NAR into the store and accounts for it.
    fn keep_nar(&self, temp: crate::store::TempFile, name: &NarName, size: u64) -> Result<(), CacheError> {
        let path = self.store.nar_path(name);
        temp.commit(&path)?;
        if !self.db.set_nar_stored(name, true)? {
            // Deleted or evicted while downloading: keeping the file would orphan it.
            Store::remove(&path)?;
            return Err(CacheError("its entry was removed during the download".into()));
        }
        self.add_usage(size, 0);
        self.enforce_limit();
        Ok(())
    }

    /// Evicts as soon as a write takes the store over the limit, so the disk never holds
    /// more than the limit plus the downloads in flight.
    fn enforce_limit(&self) {
        if let Some(max) = self.max_size {
            if self.usage.load(Ordering::Relaxed) > max {
                if let Err(e) = self.evict_to(max) {
                    log::error!("evicting to stay under --cache-max-size: {e}");
                }
            }
        }
    }

    /// The scheduled pass (`--cache-lru-schedule`).
    pub fn evict_scheduled(&self) -> Result<Evicted, CacheError> {
        match self.max_size {
            Some(max) => self.evict_to(max),
            None => Ok(Evicted::default()),
        }
    }

    /// Removes least recently used entries until the store holds at most `target` bytes.
    /// Whole entries go: a narinfo's file before its index row, and its NAR only when no
    /// other narinfo points at it. A client still reading an evicted NAR keeps its open file.
    pub fn evict_to(&self, target: u64) -> Result<Evicted, CacheError> {
        let _one_at_a_time = lock(&self.evicting);
        // Hits since the last flush must count, or a file in use could look old.
        self.flush_access_times()?;
        let mut evicted = Evicted::default();
        for (name, _) in self.db.unreferenced_nars()? {
            if self.usage.load(Ordering::Relaxed) <= target {
                break;
            }
            if let Some(r) = self.db.remove_nar(&name)? {
                self.remove_files(&r, &mut evicted)?;
            }
        }
        while self.usage.load(Ordering::Relaxed) > target {
            let victims = self.db.least_recently_used(64, db::now() - PENDING_GRACE_SECS)?;
            if victims.is_empty() {
                break;
            }
            for hash in victims {
                if self.usage.load(Ordering::Relaxed) <= target {
                    break;
                }
                // The file goes first, so the narinfo is never served once its NAR may be gone.
                lock(&self.memo).remove(&hash);
                Store::remove(&self.store.narinfo_path(&hash))?;
                if let Some(r) = self.db.remove_narinfo(&hash)? {
                    self.remove_files(&r, &mut evicted)?;
                }
            }
        }
        if evicted.narinfos + evicted.nars > 0 {
            self.metrics.evicted(evicted.narinfos, evicted.nars, evicted.bytes);
            log::info!(
                "evicted {} narinfo(s) and {} NAR(s), {} bytes; the store now holds {} of {target} bytes",
                evicted.narinfos,
                evicted.nars,
                evicted.bytes,
                self.usage.load(Ordering::Relaxed)
            );
        }
        Ok(evicted)
    }

    /// Deletes the files of what the index just dropped, and accounts for them.
    fn remove_files(&self, r: &db::Removed, tally: &mut Evicted) -> Result<(), CacheError> {
        let mut freed = 0;
        for (hash, size) in &r.narinfos {
            lock(&self.memo).remove(hash);
            Store::remove(&self.store.narinfo_path(hash))?;
            freed += size;
            tally.narinfos += 1;
        }
        if let Some((name, stored)) = &r.nar {
            Store::remove(&self.store.nar_path(name))?;
            if let Some(size) = stored {
                freed += size;
                tally.nars += 1;
            }
        }
        tally.bytes += freed;
        self.add_usage(0, freed);
        Ok(())
    }

    /// `DELETE /<hash>.narinfo`: removes it, and its NAR when nothing else uses it.
    pub fn delete_narinfo(&self, hash: &StorePathHash) -> Result<bool, CacheError> {
        lock(&self.memo).remove(hash);
        Store::remove(&self.store.narinfo_path(hash))?;
        self.forget_missing(hash);
        match self.db.remove_narinfo(hash)? {
            Some(r) => {
                self.remove_files(&r, &mut Evicted::default())?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// `DELETE /nar/<name>`: removes it and every narinfo pointing at it.
    pub fn delete_nar(&self, name: &NarName) -> Result<bool, CacheError> {
        match self.db.remove_nar(name)? {
            Some(r) => {
                self.remove_files(&r, &mut Evicted::default())?;
                Ok(true)
            }
            None => {
                // Not indexed, but a stray file of that name must not survive a DELETE.
                let path = self.store.nar_path(name);
                let existed = path.exists();
                Store::remove(&path)?;
                Ok(existed)
            }
        }
    }

    /// `PUT /nar/<name>`: keeps the upload only if its bytes hash to the name, as NARs written
    /// by `nix copy` are named (`<nix32 of sha256 of the file>.nar<ext>`).
    pub fn put_nar(&self, name: &NarName, body: &mut dyn Read, len: u64) -> Result<(), UploadError> {
        if self.max_size.is_some_and(|max| len > max) {
            return Err(UploadError::TooLarge(len));
        }
        let mut temp = self.store.temp_file()?;
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut written = 0u64;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UploadError::Bad(format!("reading the upload after {written} bytes: {e}"))),
            };
            hasher.update(&buf[..n]);
            temp.file()?.write_all(&buf[..n])?;
            written += n as u64;
        }
        let got = hasher.finish();
        let hash_part = name.as_str().split(".nar").next().unwrap_or("");
        let named = crate::nix::Hash::parse_digest(hash_part);
        if named != Some(got) {
            return Err(UploadError::Bad(format!("the upload's sha256 is {got}, which does not match its name")));
        }
        let record = NarRecord {
            name: name.clone(),
            file_hash: got,
            file_size: written,
            upstream_url: String::new(),
            stored: false,
        };
        self.db.put_nar(&record)?;
        let path = self.store.nar_path(name);
        let previous = Store::open_existing(&path)?.map(|(_, len)| len);
        temp.commit(&path)?;
        self.db.set_nar_stored(name, true)?;
        self.add_usage(written, previous.unwrap_or(0));
        self.enforce_limit();
        Ok(())
    }

    /// `PUT /<hash>.narinfo`: accepted only if it describes `hash` and its NAR was uploaded
    /// (or cached) with exactly the FileHash and FileSize it claims; then signed by ncps.
    pub fn put_narinfo(&self, hash: &StorePathHash, body: &mut dyn Read) -> Result<(), UploadError> {
        let mut bytes = Vec::new();
        body.take(crate::nix::narinfo::MAX_NARINFO_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| UploadError::Bad(format!("reading the upload: {e}")))?;
        let mut info = NarInfo::parse(&bytes).map_err(|e| UploadError::Bad(format!("narinfo: {e}")))?;
        if info.store_path_hash() != Some(*hash) {
            return Err(UploadError::Bad(format!("narinfo describes {}, not {hash}", info.store_path)));
        }
        let (file_hash, file_size) =
            info.file_digest().map_err(|e| UploadError::Bad(format!("narinfo: {e}")))?;
        let name = info
            .url
            .strip_prefix("nar/")
            .and_then(NarName::parse)
            .ok_or_else(|| UploadError::Bad(format!("URL {:?} is not nar/<hash>.nar[.ext]", info.url)))?;
        let record = match self.db.nar(&name)? {
            Some(r) if r.stored && r.file_hash == file_hash && r.file_size == file_size => r,
            Some(r) if r.stored => {
                return Err(UploadError::Bad(format!(
                    "{name} holds {} bytes with {}, the narinfo says {file_size} bytes with {file_hash}",
                    r.file_size, r.file_hash
                )))
            }
            _ => return Err(UploadError::Bad(format!("upload {name} before its narinfo"))),
        };
        if self.sign {
            info.sign(&self.key);
        }
        self.store_narinfo(hash, &info, &record)?;
        self.forget_missing(hash);
        Ok(())
    }

    /// Where to try fetching a NAR: where its narinfo came from first, then the same name on
    /// the other upstreams; URLs that failed recently go last.
    fn nar_candidates(&self, record: &NarRecord) -> Vec<String> {
        let mut urls: Vec<String> = Some(record.upstream_url.clone()).filter(|u| !u.is_empty()).into_iter().collect();
        for u in self.upstreams.list() {
            let url = format!("{}/nar/{}", u.url, record.name);
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        let mut failed = lock(&self.failed_urls);
        failed.retain(|_, t| t.elapsed() < Duration::from_secs(300));
        // An upstream that just served a bad or broken NAR is likely to serve the next one
        // badly too: its URLs go after the others', and the failed URL itself goes last.
        let bases: Vec<&str> = self.upstreams.list().iter().map(|u| u.url.as_str()).collect();
        let failed_bases: Vec<&str> = bases
            .iter()
            .copied()
            .filter(|b| failed.keys().any(|f| f.starts_with(&format!("{b}/"))))
            .collect();
        urls.sort_by_key(|u| {
            (failed.contains_key(u), failed_bases.iter().any(|b| u.starts_with(&format!("{b}/"))))
        });
        urls
    }

    /// Downloads into `temp`, hashing as it goes. Returns the URL that delivered, and whether
    /// the disk refused bytes on the way.
    fn fetch_nar(
        &self,
        record: &NarRecord,
        temp: &mut crate::store::TempFile,
        download: &Download,
    ) -> Result<(String, Spilled), String> {
        let mut last_error = String::from("no upstream has it");
        for url in self.nar_candidates(record) {
            let upstream = self.metrics.upstream_for_url(&url);
            let started = Instant::now();
            let result = self.fetch_nar_from(&url, record, temp, download, upstream);
            if let Some(i) = upstream {
                self.metrics.upstream_request(i, Kind::Nar, started.elapsed(), result.is_ok());
                if let Err((e, _)) = &result {
                    self.metrics.upstream_error_detail(i, e);
                }
            }
            match result {
                Ok(spilled) => return Ok((url, spilled)),
                Err((e, written)) => {
                    log::warn!("nar {}: {url}: {e}", record.name);
                    lock(&self.failed_urls).insert(url, Instant::now());
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
        temp: &mut crate::store::TempFile,
        download: &Download,
        upstream: Option<usize>,
    ) -> Result<Spilled, (String, u64)> {
        let body = match self.upstreams.nar(url) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(("not found".into(), 0)),
            Err(e) => return Err((e.to_string(), 0)),
        };
        if let Some(len) = body.content_length.filter(|_| !body.decoded) {
            if len != record.file_size {
                return Err((format!("upstream announces {len} bytes, the narinfo {}", record.file_size), 0));
            }
        }
        let mut reader = body.reader;
        let temp_path = temp.path().to_path_buf();
        let file = temp.file().map_err(|e| (e.to_string(), 0))?;
        let mut hasher = Hasher::new();
        let mut written = 0u64;
        let mut spilled = false;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((format!("after {written} bytes: {e}"), written)),
            };
            if written + n as u64 > record.file_size {
                return Err((format!("longer than the {} bytes the narinfo says", record.file_size), written));
            }
            hasher.update(&buf[..n]);
            if let Some(i) = upstream {
                self.metrics.upstream_bytes(i, n as u64);
            }
            if !spilled {
                if let Err(e) = file.write_all(&buf[..n]) {
                    log::error!(
                        "nar {}: writing {}: {e}; relaying the rest to waiting clients from memory, \
                         not keeping it",
                        record.name,
                        temp_path.display()
                    );
                    spilled = true;
                }
            }
            if spilled {
                download.spill(&buf[..n]).map_err(|e| (e, written))?;
            } else {
                download.progress(written + n as u64);
            }
            written += n as u64;
        }
        if written != record.file_size {
            return Err((format!("ended after {written} of {} bytes", record.file_size), written));
        }
        let got = hasher.finish();
        if got != record.file_hash {
            return Err((format!("hash mismatch: got {got}, the narinfo says {}", record.file_hash), written));
        }
        Ok(Spilled(spilled))
    }

    /// Writes the batched access times. Called periodically, so hits never write to the
    /// database themselves.
    pub fn flush_access_times(&self) -> Result<(), CacheError> {
        let touched = std::mem::take(&mut *lock(&self.touched));
        if touched.narinfos.is_empty() && touched.nars.is_empty() {
            return Ok(());
        }
        let narinfos: Vec<_> = touched.narinfos.into_iter().collect();
        let nars: Vec<_> = touched.nars.into_iter().collect();
        self.db.touch(&narinfos, &nars)?;
        Ok(())
    }

    /// Makes the index and the disk agree after a crash or a kill: removes temp files,
    /// files the index does not know, and index entries whose file is gone. Logs what it fixed.
    pub fn reconcile(&self) -> Result<(), CacheError> {
        let temps = self.store.clear_temp()?;
        let known: std::collections::HashSet<StorePathHash> = self.db.narinfo_hashes()?.into_iter().collect();
        let (on_disk, strays) = self.store.list_narinfos()?;
        let mut orphans = strays.len();
        for p in &strays {
            Store::remove(p)?;
        }
        let on_disk: std::collections::HashSet<StorePathHash> = on_disk.into_iter().collect();
        for h in on_disk.difference(&known) {
            Store::remove(&self.store.narinfo_path(h))?;
            orphans += 1;
        }
        let mut dropped = 0;
        for h in known.difference(&on_disk) {
            self.db.delete_narinfo(h)?;
            dropped += 1;
        }
        let stored: std::collections::HashSet<NarName> = self.db.stored_nar_names()?.into_iter().collect();
        let (nars, strays) = self.store.list_nars()?;
        orphans += strays.len();
        for p in &strays {
            Store::remove(p)?;
        }
        let mut present = std::collections::HashSet::new();
        for (name, len) in nars {
            let record = self.db.nar(&name)?;
            // A NAR file is kept only if the index says it was verified, with this size.
            if stored.contains(&name) && record.is_some_and(|r| r.file_size == len) {
                present.insert(name);
            } else {
                Store::remove(&self.store.nar_path(&name))?;
                orphans += 1;
            }
        }
        for name in stored.difference(&present) {
            self.db.set_nar_stored(name, false)?;
            dropped += 1;
        }
        self.usage.store(self.db.usage()?, Ordering::Relaxed);
        if temps + orphans + dropped > 0 {
            log::warn!(
                "start-up check: removed {temps} temp file(s) and {orphans} file(s) the index did not \
                 vouch for; dropped {dropped} index entr(y/ies) whose file was missing"
            );
        } else {
            log::info!("start-up check: store and index agree");
        }
        Ok(())
    }
}

/// Whether a download had to be relayed from memory because the disk refused its bytes.
struct Spilled(bool);

struct DownloadJob {
    record: NarRecord,
    temp: crate::store::TempFile,
    download: Arc<Download>,
}

/// The scheme and authority of `url` (`http://host:port`): which upstream it is on.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

/// Where ncps keeps a NAR (its name) and where to fetch it (an absolute URL), from a
/// narinfo's `URL`. Relative URLs are resolved against the upstream; absolute ones must stay
/// on the upstream's own origin, so a narinfo cannot send ncps to fetch from anywhere else.
fn nar_location(base: &str, url: &str, file_hash: &crate::nix::Hash, compression: &str) -> Result<(NarName, String), String> {
    let absolute = if url.starts_with("http://") || url.starts_with("https://") {
        if origin(url) != origin(base) {
            return Err(format!("URL {url:?} points outside the upstream"));
        }
        url.to_string()
    } else if url.contains("..") || url.starts_with('/') || url.contains("://") {
        return Err(format!("URL {url:?} is not a plain relative path"));
    } else {
        format!("{base}/{url}")
    };
    let last = url.rsplit('/').next().unwrap_or("");
    let last = last.split('?').next().unwrap_or("");
    let name = NarName::parse(last)
        .or_else(|| NarName::for_file(file_hash, compression))
        .ok_or_else(|| format!("cannot name a NAR with compression {compression:?}"))?;
    Ok((name, absolute))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nar_urls_stay_on_their_upstream() {
        let h = crate::nix::Hash::of(b"x");
        let n = format!("{}.nar.xz", h.to_nix32());
        let (name, url) = nar_location("http://up:1", &format!("nar/{n}"), &h, "xz").unwrap();
        assert_eq!((name.as_str(), url.as_str()), (n.as_str(), format!("http://up:1/nar/{n}").as_str()));
        assert!(nar_location("http://up:1", "http://evil:1/nar/x.nar", &h, "xz").is_err());
        assert!(nar_location("http://up:1", "../../x", &h, "xz").is_err());
        // An opaque upstream name is replaced by one made from the file hash.
        let (name, _) = nar_location("http://up:1", "blobs/0c5e2f", &h, "zstd").unwrap();
        assert_eq!(name.as_str(), format!("{}.nar.zst", h.to_nix32()));
    }
}
