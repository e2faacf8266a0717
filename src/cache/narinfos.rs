//! Narinfo hits and misses: the memo of recently served narinfos, the negative cache, and the
//! single-flight upstream lookup whose answer passes the trust rules before it is stored.

use super::flight::SingleFlight;
use super::health::{Attempt, Missed, Tally};
use super::{lock, trust, Answer, Cache, CacheError};
use crate::http::Body;
use crate::index::{NarRecord, Recorded};
use crate::memo::Memo;
use crate::metrics::Kind;
use crate::nix::{NarInfo, StorePathHash};
use crate::storage::Blob;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Memory for recently served narinfos (a few thousand typical ones).
const MEMO_BUDGET: usize = 4 << 20;
/// Larger narinfos (thousands of references) are served from the store each time.
const MEMO_ENTRY_MAX: u64 = crate::storage::local::NARINFO_READ_MAX as u64;
/// Hashes remembered as missing at most: a flood of lookups for random hashes must not grow
/// memory without limit.
const NEGATIVE_MAX: usize = 100_000;

/// What a narinfo miss produced, shared by everyone who asked at the same time: the narinfo
/// ncps serves and the upstream it came from, or why no upstream delivered it.
type Found = Result<(Arc<str>, Arc<Vec<u8>>), Missed>;

/// Where a narinfo another replica looked up came from, for the log and the metrics.
const REPLICA: &str = "another replica";
/// The holder of every shared negative-cache row.
const ABSENT: &str = "absent";
/// The shared negative cache's expired rows are deleted at every this many recorded misses.
const PURGE_EVERY: u64 = 256;

/// The lease key under which replicas sharing an index remember `hash` as absent.
fn absent_key(hash: &StorePathHash) -> String {
    format!("absent/{hash}")
}

pub(super) struct State {
    flights: SingleFlight<StorePathHash, Found>,
    negative: Mutex<HashMap<StorePathHash, Instant>>,
    /// Misses recorded in the shared negative cache (to purge its expired rows now and then).
    recorded_absent: std::sync::atomic::AtomicU64,
    /// Recently served narinfos, so a hit needs no store call.
    memo: Mutex<Memo>,
}

impl State {
    pub(super) fn new() -> State {
        State {
            flights: SingleFlight::new(),
            negative: Mutex::new(HashMap::new()),
            recorded_absent: std::sync::atomic::AtomicU64::new(0),
            memo: Mutex::new(Memo::new(MEMO_BUDGET, Duration::from_secs(60))),
        }
    }

    pub(super) fn forget(&self, hash: &StorePathHash) {
        lock(&self.memo).remove(hash);
    }
}

impl Cache {
    /// The narinfo if it is here (a hit), without ever asking upstream.
    /// Whether this narinfo is here (memo or store), so that a request for it needs no
    /// upstream: the HTTP front's choice of worker pool. Touches nothing; may be stale by the
    /// time the request is answered, which costs only the choice of pool.
    pub fn holds_narinfo(&self, hash: &StorePathHash) -> bool {
        lock(&self.narinfos.memo).get(hash).is_some() || matches!(self.blobs.narinfo(hash), Ok(Some(_)))
    }

    /// [`Cache::holds_narinfo`] without waiting, for the HTTP poll loop: with an object store
    /// ([`crate::storage::BlobStore::reads_are_local`] false) only the memo is asked, since
    /// nothing on the poll loop may wait for the network; "no" sends the request to the
    /// upstream pool, where a miss belongs (a hit there is served all the same).
    pub fn holds_narinfo_now(&self, hash: &StorePathHash) -> bool {
        if self.blobs.reads_are_local() {
            return self.holds_narinfo(hash);
        }
        lock(&self.narinfos.memo).get(hash).is_some()
    }

    /// [`Cache::narinfo_hit`] for the HTTP poll loop: from the memo, or from the store when
    /// reading it is local; `None` sends the request to a worker.
    pub fn narinfo_hit_fast(&self, hash: &StorePathHash) -> Result<Option<Body>, CacheError> {
        if self.blobs.reads_are_local() {
            return self.narinfo_hit(hash);
        }
        Ok(self.memo_hit(hash).ok())
    }

    /// The narinfo from the memo, or, when it is not there, the memo's count of removals (for
    /// [`Memo::insert_read`] after reading the store).
    fn memo_hit(&self, hash: &StorePathHash) -> Result<Body, u64> {
        let mut memo = lock(&self.narinfos.memo);
        let Some(bytes) = memo.get(hash) else { return Err(memo.removals()) };
        drop(memo);
        self.touch_narinfo(hash);
        Ok(Body::Bytes(bytes.to_vec()))
    }

    pub fn narinfo_hit(&self, hash: &StorePathHash) -> Result<Option<Body>, CacheError> {
        let removals = match self.memo_hit(hash) {
            Ok(body) => return Ok(Some(body)),
            Err(removals) => removals,
        };
        let Some(blob) = self.blobs.narinfo(hash)? else {
            return Ok(None);
        };
        self.touch_narinfo(hash);
        if blob.len() > MEMO_ENTRY_MAX {
            return Ok(Some(body_of(blob)));
        }
        let bytes = blob.into_bytes()?;
        lock(&self.narinfos.memo).insert_read(*hash, Arc::from(&bytes[..]), removals);
        Ok(Some(Body::Bytes(bytes)))
    }

    /// `GET /<hash>.narinfo`. `client_gone` says whether the client that asked has left: a
    /// lookup every client left is given up (see [`SingleFlight::run_while`]), so a slow
    /// upstream does not hold its connection for clients that are gone.
    pub fn narinfo(&self, hash: &StorePathHash, client_gone: &dyn Fn() -> bool) -> Result<Answer, CacheError> {
        if let Some(body) = self.narinfo_hit(hash)? {
            return Ok(Answer::Hit(body));
        }
        if self.is_known_missing(hash) {
            return Ok(Answer::NotFound);
        }
        let flight = self.narinfos.flights.run_while(*hash, client_gone, |abandoned| self.fetch_narinfo_once(hash, abandoned));
        let Ok((found, _)) = flight else {
            return Ok(Answer::Unavailable { status: 503, reason: "the client left before an upstream answered".into() });
        };
        Ok(match found {
            Ok((from, bytes)) => Answer::Miss(Body::Bytes(bytes.to_vec()), from),
            Err(missed) => missed.answer(),
        })
    }

    /// `GET /upload/<hash>.narinfo`: the local cache only. A client about to upload asks
    /// whether the path is here; asking upstream for a path only it has built is wasted time.
    pub fn narinfo_local(&self, hash: &StorePathHash) -> Result<Answer, CacheError> {
        Ok(self.narinfo_hit(hash)?.map_or(Answer::NotFound, Answer::Hit))
    }

    /// Whether an upstream serves `hash` (for an upload of it): the negative cache, else a
    /// lookup as for a miss (whose narinfo, if verified, is then held).
    pub(super) fn upstream_says(&self, hash: &StorePathHash) -> trust::UpstreamSays {
        if self.is_known_missing(hash) {
            return trust::UpstreamSays::Absent;
        }
        let (found, _) = self.narinfos.flights.run(*hash, || self.fetch_narinfo_once(hash, &|| false));
        match found {
            Ok((from, _)) => trust::UpstreamSays::Serves(from.to_string()),
            Err(m) if m.verdict == super::health::Verdict::Absent => trust::UpstreamSays::Absent,
            Err(m) => trust::UpstreamSays::Unknown(m.reason.to_string()),
        }
    }

    fn is_known_missing(&self, hash: &StorePathHash) -> bool {
        {
            let mut negative = lock(&self.narinfos.negative);
            match negative.get(hash) {
                Some(t) if t.elapsed() < self.settings.negative_ttl => return true,
                Some(_) => {
                    negative.remove(hash);
                }
                None => {}
            }
        }
        // Replicas sharing the index share what they found absent: a lease row named after
        // the hash, expiring with the negative TTL (no table of its own).
        if self.index.is_shared() && !self.settings.negative_ttl.is_zero() {
            match self.index.lease_holder(&absent_key(hash), crate::index::now()) {
                Ok(found) => return found.is_some(),
                Err(e) => log::warn!("narinfo {hash}: reading the shared negative cache: {e}"),
            }
        }
        false
    }

    fn remember_missing(&self, hash: &StorePathHash) {
        let ttl = self.settings.negative_ttl;
        if ttl.is_zero() {
            return;
        }
        {
            let mut negative = lock(&self.narinfos.negative);
            if negative.len() >= NEGATIVE_MAX {
                negative.retain(|_, t| t.elapsed() < ttl);
                if negative.len() >= NEGATIVE_MAX {
                    negative.clear();
                }
            }
            negative.insert(*hash, Instant::now());
        }
        if self.index.is_shared() {
            let now = crate::index::now();
            let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
            if let Err(e) = self.index.take_lease(&absent_key(hash), ABSENT, now, secs) {
                log::warn!("narinfo {hash}: recording it in the shared negative cache: {e}");
            }
            // Expired entries are cleared now and then, by whichever replica records one.
            if self.narinfos.recorded_absent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PURGE_EVERY == 0 {
                if let Err(e) = self.index.purge_expired_leases(now) {
                    log::warn!("clearing expired entries of the shared negative cache: {e}");
                }
            }
        }
    }

    /// Forgets that `hash` was missing (an upload or a new upstream can make it exist).
    pub fn forget_missing(&self, hash: &StorePathHash) {
        lock(&self.narinfos.negative).remove(hash);
        if self.index.is_shared() {
            if let Err(e) = self.index.release_lease(&absent_key(hash), ABSENT) {
                log::warn!("narinfo {hash}: clearing it from the shared negative cache: {e}");
            }
        }
    }

    /// [`Cache::fetch_narinfo`], by one replica at a time when replicas share the index
    /// (`replicas`): the others answer from what its lookup stored or found absent.
    fn fetch_narinfo_once(&self, hash: &StorePathHash, abandoned: &dyn Fn() -> bool) -> Found {
        match self.narinfo_turn(hash, abandoned) {
            super::replicas::NarinfoTurn::Alone => self.fetch_narinfo(hash, abandoned),
            super::replicas::NarinfoTurn::Mine => {
                let found = self.fetch_narinfo(hash, abandoned);
                self.end_narinfo_turn(hash);
                found
            }
            super::replicas::NarinfoTurn::Stored(bytes) => {
                log::info!("narinfo {hash}: looked up by another replica");
                self.touch_narinfo(hash);
                Ok((Arc::from(REPLICA), Arc::new(bytes)))
            }
            super::replicas::NarinfoTurn::Absent => {
                let mut tally = Tally::default();
                tally.add(REPLICA, Attempt::Absent, "not found");
                Err(tally.missed())
            }
        }
    }

    /// What another replica's lookup of `hash` settled, if anything yet: the narinfo it stored
    /// (read once, here), or that the hash is absent. An unreadable narinfo settles nothing.
    pub(super) fn settled_elsewhere(&self, hash: &StorePathHash) -> Option<super::replicas::NarinfoTurn> {
        if let Ok(Some(blob)) = self.blobs.narinfo(hash) {
            match blob.into_bytes() {
                Ok(bytes) => return Some(super::replicas::NarinfoTurn::Stored(bytes)),
                Err(e) => log::warn!("narinfo {hash}: reading what another replica stored: {e}"),
            }
        }
        self.is_known_missing(hash).then_some(super::replicas::NarinfoTurn::Absent)
    }

    /// Asks the upstreams in turn; stops (asking nobody else) once `abandoned` says every
    /// client left.
    fn fetch_narinfo(&self, hash: &StorePathHash, abandoned: &dyn Fn() -> bool) -> Found {
        let mut tally = Tally::default();
        for (i, upstream) in self.upstreams.list().iter().enumerate() {
            if abandoned() {
                log::info!("narinfo {hash}: every client left; lookup stopped");
                return Err(tally.missed_for_nobody());
            }
            let shown = self.health.shown(i);
            if let Some(skipped) = self.health.skip(i) {
                tally.add(shown, skipped, self.health.why_skipped(i));
                continue;
            }
            let started = Instant::now();
            let span = crate::otel::span("upstream narinfo", crate::otel::SpanKind::Client);
            span.set("ncps.upstream", crate::otel::shown_url(&upstream.url));
            span.set("ncps.narinfo", hash.to_string());
            let (result, head) = self.upstreams.narinfo_timed(upstream, hash, abandoned);
            if let Err(crate::upstream::UpstreamError::Abandoned) = result {
                log::info!("narinfo {hash}: every client left; lookup at {} stopped", upstream.url);
                return Err(tally.missed_for_nobody());
            }
            self.metrics.upstream_request(i, Kind::Narinfo, started.elapsed(), result.is_ok());
            if let Some(head) = head {
                self.metrics.narinfo_lookup(i, head);
            }
            let bytes = match result {
                Ok(Some(b)) => {
                    self.health.succeeded(i);
                    span.set("http.response.status_code", 200u16);
                    b
                }
                Ok(None) => {
                    self.health.succeeded(i);
                    span.set("http.response.status_code", 404u16);
                    span.set("ncps.result", "absent");
                    tally.add(shown, Attempt::Absent, "not found");
                    continue;
                }
                Err(e) => {
                    span.set("ncps.result", "error");
                    span.fail(&e);
                    log::warn!("upstream {}: narinfo {hash}: {e}; trying the next", upstream.url);
                    self.metrics.upstream_error_detail(i, &e.to_string());
                    let attempt = self.upstream_failed(i, &e);
                    tally.add(shown, attempt, &e);
                    continue;
                }
            };
            self.metrics.upstream_narinfo_bytes(i, bytes.len() as u64);
            match trust::accept_upstream(hash, &bytes, &self.settings.trusted_keys, &upstream.url) {
                Ok(accepted) => {
                    let (info, record) = accepted.served(self.signer());
                    let (nar, nar_size) = (record.name.to_string(), record.file_size);
                    let Some(served) = self.keep_accepted_narinfo(hash, &info, record) else {
                        tally.add(shown, Attempt::Refused, "refused: its NAR name stands for other bytes here");
                        continue;
                    };
                    span.set("ncps.result", "found");
                    log::info!(
                        "narinfo {hash}: from {} in {:.1}ms",
                        upstream.url,
                        started.elapsed().as_secs_f64() * 1000.0
                    );
                    self.metrics.narinfo_fetched(i, &info.store_path, &nar, Some(nar_size), started.elapsed());
                    return Ok((Arc::from(upstream.url.as_str()), Arc::new(served)));
                }
                Err(why) => {
                    span.set("ncps.result", "refused");
                    span.fail(&why);
                    log::warn!("upstream {}: narinfo {hash} refused: {why}; trying the next", upstream.url);
                    tally.add(shown, Attempt::Refused, format_args!("refused: {why}"));
                }
            }
        }
        let missed = tally.missed();
        // Only a clean "no" from every upstream is remembered: an upstream that failed may
        // have it a moment later, and an outage must not look like absence once it ends.
        if missed.remember {
            self.remember_missing(hash);
        }
        if !matches!(missed.verdict, super::health::Verdict::Absent) {
            log::info!("narinfo {hash}: {}", missed.reason);
        }
        Err(missed)
    }

    /// Stores a verified upstream narinfo; returns the bytes to serve. A full disk must not
    /// turn a verified answer into an error: then it is served, nothing is kept, and where its
    /// NAR is is remembered so that can be served too.
    /// `None` when its NAR's name stands for other bytes in the index: then it is not served.
    fn keep_accepted_narinfo(&self, hash: &StorePathHash, info: &NarInfo, record: NarRecord) -> Option<Vec<u8>> {
        match self.store_narinfo(hash, info, &record) {
            Ok(served) => Some(served),
            Err(e @ CacheError::NameTaken(_)) => {
                log::warn!("narinfo {hash}: refused: {e}");
                None
            }
            Err(e) => {
                log::error!("narinfo {hash}: verified but not kept: {e}");
                let mut unindexed = lock(&self.unindexed);
                if unindexed.len() >= 10_000 {
                    unindexed.clear();
                }
                unindexed.insert(record.name.clone(), record);
                Some(info.to_string().into_bytes())
            }
        }
    }

    /// Indexes and stores the narinfo ncps serves; returns its bytes.
    pub(super) fn store_narinfo(
        &self,
        hash: &StorePathHash,
        info: &NarInfo,
        record: &NarRecord,
    ) -> Result<Vec<u8>, CacheError> {
        let served = info.to_string().into_bytes();
        let span = crate::otel::span("store write", crate::otel::SpanKind::Internal);
        span.set("ncps.store.kind", "narinfo");
        span.set("ncps.store.bytes", served.len());
        let _writing = self.writing();
        // Index first, blob second: a crash between the two leaves an index entry without a
        // blob, which the store check drops, never a served narinfo whose NAR nobody can find.
        let replaced_size = match self.index.put_narinfo(hash, &info.store_path, record, served.len() as u64)? {
            Recorded::Done { replaced_size } => replaced_size,
            // Another narinfo's NAR has this name with other bytes: it stays theirs.
            Recorded::NameTaken => return Err(CacheError::NameTaken(record.name.clone())),
        };
        if let Err(e) = self.blobs.put_narinfo(hash, &served, &self.staging) {
            // The index may take a row when the disk has no room for the blob (a full disk
            // with space left in the database's pages): a row this call added goes again, so
            // the next request is a clean miss. Only the row: its NAR (an upload's, say) may
            // be stored and wanted. A row that was there before keeps its blob, if any.
            if replaced_size == 0 {
                if let Err(e2) = self.index.delete_narinfo_row(hash) {
                    log::warn!("narinfo {hash}: its index row stays until the next store check: {e2}");
                }
            }
            return Err(e.into());
        }
        lock(&self.narinfos.memo).replace(*hash, Arc::from(&served[..]));
        self.space.add(served.len() as u64, replaced_size);
        self.enforce_limit();
        Ok(served)
    }
}

/// A blob as an HTTP body: a local file goes out with `sendfile`, a stream in chunks.
pub(super) fn body_of(blob: Blob) -> Body {
    match blob {
        Blob::File { file, len } => Body::File { file, len },
        Blob::Bytes(b) => Body::Bytes(b),
        Blob::Reader { reader, len, .. } => Body::Stream { reader, len },
    }
}
