//! The cache core: hits from the store, misses from upstream, each miss fetched once.
//!
//! [`Cache`] is the facade the HTTP routes call; the work is split by job, one file each:
//!
//! | file | job |
//! |---|---|
//! | `trust.rs` | the trust rules, pure: what is accepted from upstreams and uploads, what is signed |
//! | `sources.rs` | where to fetch a NAR, pure: upstream order, failover, what failed recently |
//! | `health.rs` | upstreams marked down and probed back (a pure state machine), and whether a miss is a 404 or a 5xx |
//! | `narinfos.rs` | narinfo hits (with the memo), misses, the negative cache |
//! | `downloads.rs` | NAR hits and single-flight NAR downloads, verified as they stream |
//! | `flight.rs` | the single-flight primitives: one computation or download per key |
//! | `resume.rs` | a NAR body that breaks off is finished with a Range request, same file |
//! | `verify.rs` | the one read-hash-write loop (downloads, uploads, fsck) |
//! | `uploads.rs` | `PUT` of NARs and narinfos |
//! | `eviction.rs` | size accounting, the background evictor, deletes |
//! | `access.rs` | last-use times, batched so a hit never writes to the index |
//! | `check.rs`, `startup.rs` | the store/index comparison, and what start-up checks when |
//!
//! The rules that make ncps safe to put between a LAN and the internet:
//! - a narinfo is stored and signed only if an upstream signature verifies against a trusted
//!   key (with no keys configured it is passed on unsigned by ncps);
//! - a NAR is stored only if its size and SHA-256 match what its narinfo promised;
//! - nothing appears under its final name until it is complete and checked.
//!
//! Storage and index are seams ([`crate::storage::BlobStore`], [`crate::index::Index`]): this
//! module never builds a file path and never sees SQL.

mod access;
pub mod check;
mod downloads;
mod error;
mod eviction;
pub mod flight;
pub mod health;
mod narinfos;
mod resume;
pub mod sources;
mod startup;
pub mod trust;
mod uploads;
pub mod verify;
pub mod zstd_copies;
pub mod replicas;

pub use error::{CacheError, UploadError};
pub use eviction::{Evicted, Pass};

use crate::http::Body;
use crate::index::{Index, NarRecord};
use crate::metrics::{Metrics, StoreStats};
use crate::nix::{NarName, PublicKey, SecretKey};
use crate::storage::{BlobStore, Staging};
use crate::upstream::Upstreams;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An answer from the cache, for the HTTP front to send.
pub enum Answer {
    /// Served from the store.
    Hit(Body),
    /// Served from the store, zstd-encoded (`Content-Encoding: zstd`).
    HitZstd(Body),
    /// Stored, and to be fetched by the client from this URL (`--cache-storage-s3-redirect`).
    Redirect(String),
    /// Fetched (or being fetched) from upstream: the body and where it comes from, for the log.
    Miss(Body, Arc<str>),
    /// Only the length is known (a HEAD for a NAR not fetched yet).
    Length(u64),
    NotFound,
    /// Too many downloads at once: try again shortly.
    Busy,
    /// No upstream answered cleanly, so whether it exists is unknown: `status` is 502, or 504
    /// when every failure was a timeout ([`health::verdict`]); `reason` says what each said.
    Unavailable { status: u16, reason: String },
}

/// What the cache core is told by the configuration (built in `serve::prepare`).
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Upstream keys a narinfo must be signed by (none: pass narinfos on unsigned by ncps).
    pub trusted_keys: Vec<PublicKey>,
    /// Whether ncps adds its own signature to what it verified.
    pub sign: bool,
    /// How long "no upstream has it" is remembered.
    pub negative_ttl: Duration,
    /// Readers of a download give up after this long without a byte.
    pub stall_limit: Duration,
    /// The upstream deadlines: a download gives its slot back once its NAR's has passed.
    pub deadlines: crate::upstream::Deadlines,
    /// Downloads running at once at most (they outlive their clients, so the worker pool does
    /// not bound them).
    pub max_downloads: usize,
    /// `--cache-max-size`.
    pub max_size: Option<u64>,
    /// The file whose presence at start says the last stop was clean.
    pub clean_marker: PathBuf,
    /// The data path held nothing when this start began (absent, or empty but for
    /// `lost+found`): this ncps has never written through it, so no crash of its own can have
    /// left anything behind (see `startup`).
    pub new_data_path: bool,
    /// Whether other ncps serve this data path beside this one (they hold its lock too).
    pub peers: crate::data_lock::Peers,
    /// What uploads may be.
    pub uploads: trust::UploadPolicy,
    /// `--cache-zstd-responses`: plain NARs go zstd-encoded to clients that ask.
    pub zstd_responses: bool,
    /// `--server-advertise-addr` (`http://host:port`): replicas share downloads (`replicas`).
    pub advertise: Option<String>,
    /// `--cache-get-token`: what this replica presents when it streams a NAR from another
    /// (every replica serves reads only with it).
    pub peer_token: Option<crate::auth::Secret>,
}

/// Where the cache keeps things: the two seams and the local staging directory.
pub struct Parts {
    pub blobs: Arc<dyn BlobStore>,
    pub index: Arc<dyn Index>,
    pub staging: Staging,
}

pub struct Cache {
    blobs: Arc<dyn BlobStore>,
    index: Arc<dyn Index>,
    staging: Staging,
    upstreams: Upstreams,
    settings: CacheSettings,
    key: SecretKey,
    narinfos: narinfos::State,
    downloads: downloads::State,
    space: eviction::Space,
    zstd: zstd_copies::State,
    replicas: replicas::State,
    access: access::Touched,
    /// NARs of narinfos that were served but could not be indexed (a full disk).
    unindexed: Mutex<HashMap<NarName, NarRecord>>,
    metrics: Arc<Metrics>,
    health: health::Board,
    /// Held (shared) by every write to the store or index; taken whole at a clean stop, so
    /// that nothing is written after the clean-stop marker.
    writes: RwLock<()>,
    /// Whether this ncps knows that store and index agree: its start found the clean-stop
    /// marker (or had nothing of its own to check), or its store check ran to the end with
    /// nothing skipped. Only then does its clean stop leave the marker.
    vouches: std::sync::atomic::AtomicBool,
}

impl Cache {
    pub fn new(settings: CacheSettings, parts: Parts, upstreams: Upstreams, key: SecretKey) -> Cache {
        let urls: Vec<String> = upstreams.list().iter().map(|u| u.url.clone()).collect();
        let metrics = Arc::new(Metrics::new(&urls));
        if let Some(me) = &settings.advertise {
            metrics.set_replica(me.trim_start_matches("http://"));
        }
        Cache {
            blobs: parts.blobs,
            index: parts.index,
            staging: parts.staging,
            upstreams,
            space: eviction::Space::new(settings.max_size),
            settings,
            key,
            narinfos: narinfos::State::new(),
            downloads: downloads::State::new(),
            zstd: zstd_copies::State::default(),
            replicas: replicas::State::default(),
            access: access::Touched::default(),
            unindexed: Mutex::new(HashMap::new()),
            health: health::Board::new(&urls, metrics.clone()),
            metrics,
            writes: RwLock::new(()),
            vouches: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `--cache-zstd-responses`.
    pub fn zstd_responses(&self) -> bool {
        self.settings.zstd_responses
    }

    /// Figures about the store, for metrics and the status page (constant time).
    pub fn figures(&self) -> Result<StoreStats, CacheError> {
        let totals = self.index.totals()?;
        Ok(StoreStats {
            size_bytes: self.space.usage(),
            narinfo_count: totals.narinfos,
            nar_count: totals.nars,
            max_size: self.settings.max_size,
        })
    }

    /// Whether the store and the index can be used right now (`/healthz`).
    pub fn health(&self) -> Result<(), CacheError> {
        self.index.totals()?;
        // A temp file proves the disk takes new files (it is removed at once).
        drop(self.staging.temp_file()?);
        Ok(())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// The upstream origins ncps sends credentials to (for the start-up log).
    pub fn upstream_credential_origins(&self) -> Vec<String> {
        self.upstreams.credential_origins()
    }

    /// The key ncps signs with, if it signs at all.
    fn signer(&self) -> Option<&SecretKey> {
        self.settings.sign.then_some(&self.key)
    }

    /// A share of the write lock. Once a clean stop has taken the lock whole, this waits for
    /// ever: nothing may be written after the clean-stop marker.
    fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.writes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the background work: the evictor, the access-time recorder and, after anything
    /// but a clean stop, the store check. Call once, after [`Cache::new`].
    pub fn start(self: &Arc<Self>) -> Result<(), CacheError> {
        let clean = self.start_up()?;
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name.into()).spawn(f).map(drop).map_err(CacheError::Thread)
        };
        let c = Arc::clone(self);
        spawn("evictor", Box::new(move || c.run_evictor()))?;
        let c = Arc::clone(self);
        spawn("access-times", Box::new(move || c.run_access_recorder()))?;
        if !clean {
            let c = Arc::clone(self);
            spawn("store-check", Box::new(move || c.run_background_check()))?;
        }
        for i in 0..self.upstreams.list().len() {
            let c = Arc::clone(self);
            spawn("upstream-probe", Box::new(move || c.run_prober(i)))?;
        }
        if self.settings.max_size.is_some() {
            self.space.wake(eviction::Pass::Thorough);
        }
        Ok(())
    }

    /// A clean stop: waits for writes in progress, records access times, and leaves the
    /// marker that lets the next start skip the store check, if this ncps knows the store is
    /// sound (see [`Cache::vouches`]) and no other ncps still serves the data path (the marker
    /// would vouch for its writes too: the last one to stop leaves it). Nothing is written
    /// after it.
    pub fn stop(&self) {
        let all = self.writes.write().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = self.flush_access_times_locked() {
            log::warn!("recording access times: {e}");
        }
        if let Err(e) = self.index.checkpoint() {
            log::warn!("{e}; the next start reads the index's WAL back");
        }
        if self.settings.peers.others() {
            log::info!("another ncps still serves this data path: the clean-stop marker is left to the last one to stop");
        } else if !self.vouches.load(std::sync::atomic::Ordering::SeqCst) {
            log::warn!("the store was not checked since the last unclean stop: no clean-stop marker, so the next start checks it");
        } else if let Err(e) = startup::leave_marker(&self.settings.clean_marker) {
            log::warn!("{e}; the next start will check the store");
        }
        // The process exits next; the lock stays taken so no thread writes after the marker.
        std::mem::forget(all);
    }
}
