//! Size accounting, the evictor, and deletes.
//!
//! `--cache-max-size` counts stored NARs (each once, however many narinfos share it) plus
//! narinfos. A write that takes the store over the limit only wakes the evictor thread and
//! returns: hits, downloads and other writes never wait for a pass. A pass removes whole
//! entries, least recently used first, in batches of [`BATCH`]: the batch's narinfo blobs
//! first (so a narinfo is never served once its NAR may be gone), then its rows in one index
//! transaction, then the NAR blobs no other narinfo uses. A client still reading an evicted
//! NAR keeps its open file.

use super::{Cache, CacheError};
use crate::index::{now, Index, Removed};
use crate::storage::StorageError;
use crate::nix::{NarName, StorePathHash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Entries removed per index transaction. On a fresh ext4 without `discard`, a pass of 50k
/// entries took 8.9 s in batches of 512 and 5.2 s in batches of 4,096 (the index's share of
/// a batch falls as its rows share B-tree pages). A write that waits for the index meanwhile
/// waits for one batch: 0.2 s typically, 0.6 s when it ends in a checkpoint. A pass that
/// only brings the store back under its limit after one write removes a few entries.
const BATCH: usize = 4096;

/// How long a narinfo whose NAR has not been fetched is safe from eviction: the time a client
/// may take between reading a narinfo and asking for its NAR.
const PENDING_GRACE_SECS: i64 = 600;

/// Whether [`Cache::remove_blobs`] still has to remove the narinfo blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Narinfos {
    ToRemove,
    AlreadyGone,
}

/// What an eviction pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    pub narinfos: u64,
    pub nars: u64,
    pub bytes: u64,
}

pub(super) struct Space {
    max: Option<u64>,
    /// Bytes the store holds, kept in step with the index's totals.
    usage: AtomicU64,
    /// One pass at a time.
    evicting: Mutex<()>,
    /// A pass is wanted; and whether a thorough one (see [`Pass`]).
    wanted: Mutex<Option<Pass>>,
    wake: Condvar,
}

/// How much a pass looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// After a write crossed the limit: least recently used entries only, a few hundred index
    /// rows read per batch, whatever the store holds.
    Quick,
    /// At start and on `--cache-lru-schedule`: first the NARs no narinfo points at (an upload
    /// whose narinfo never came, a NAR a replaced narinfo no longer uses), which takes a scan
    /// of the NAR table; then as [`Pass::Quick`].
    Thorough,
}

impl Space {
    pub(super) fn new(max: Option<u64>) -> Space {
        Space { max, usage: AtomicU64::new(0), evicting: Mutex::new(()), wanted: Mutex::new(None), wake: Condvar::new() }
    }

    pub(super) fn usage(&self) -> u64 {
        self.usage.load(Ordering::Relaxed)
    }

    pub(super) fn add(&self, added: u64, removed: u64) {
        if added >= removed {
            self.usage.fetch_add(added - removed, Ordering::Relaxed);
        } else {
            let _ = self.usage.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(removed - added))
            });
        }
    }

    /// Takes the figure from the index again (after a pass or a check).
    pub(super) fn refresh(&self, index: &dyn Index) {
        match index.totals() {
            Ok(t) => self.usage.store(t.bytes(), Ordering::Relaxed),
            Err(e) => log::warn!("reading the store's size: {e}"),
        }
    }

    fn over(&self) -> bool {
        self.max.is_some_and(|max| self.usage() > max)
    }

    /// Asks the evictor for a pass (a thorough one wins over a quick one).
    pub(super) fn wake(&self, pass: Pass) {
        let mut wanted = super::lock(&self.wanted);
        if *wanted != Some(Pass::Thorough) {
            *wanted = Some(pass);
        }
        self.wake.notify_one();
    }
}

impl Cache {
    /// After a write: wakes the evictor if the store is over its limit.
    pub(super) fn enforce_limit(&self) {
        if self.space.over() {
            self.space.wake(Pass::Quick);
        }
    }

    /// The evictor thread: a pass whenever a write crossed the limit (or at start).
    pub(super) fn run_evictor(&self) {
        super::access::lower_priority(10);
        loop {
            let pass = {
                let mut wanted = super::lock(&self.space.wanted);
                loop {
                    if let Some(pass) = wanted.take() {
                        break pass;
                    }
                    wanted = self.space.wake.wait(wanted).unwrap_or_else(|p| p.into_inner());
                }
            };
            let result = match self.settings.max_size {
                Some(max) => self.evict_to(max, pass),
                None => Ok(Evicted::default()),
            };
            if let Err(e) = result {
                log::error!("evicting to stay under --cache-max-size: {e}");
                // Do not spin on a failing index.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// A thorough pass to the limit (`--cache-lru-schedule`).
    pub fn evict_scheduled(&self) -> Result<Evicted, CacheError> {
        match self.settings.max_size {
            Some(max) => self.evict_to(max, Pass::Thorough),
            None => Ok(Evicted::default()),
        }
    }

    /// Removes entries until the store holds at most `target` bytes.
    pub fn evict_to(&self, target: u64, pass: Pass) -> Result<Evicted, CacheError> {
        let _one_at_a_time = super::lock(&self.space.evicting);
        // Replicas sharing the index share its totals: one of them evicts for all.
        let Some(evictor) = self.evictor_lease() else { return Ok(Evicted::default()) };
        let span = crate::otel::span("eviction", crate::otel::SpanKind::Internal);
        span.set("ncps.eviction.pass", if pass == Pass::Thorough { "thorough" } else { "quick" });
        span.set("ncps.eviction.target_bytes", target);
        let started = Instant::now();
        // Hits since the last flush must count, or an entry in use could look old.
        self.flush_access_times()?;
        self.space.refresh(&*self.index);
        let mut evicted = Evicted::default();
        // NARs no narinfo points at go first (they serve no one).
        if pass == Pass::Thorough {
            self.evict_unreferenced(target, &mut evicted)?;
        }
        // The NAR blobs of one batch are removed on another thread while the next batch's
        // narinfos and index rows go: unlinks mostly wait for the disk and the index mostly
        // uses a core, so the two overlap (DESIGN.md, "A million entries").
        std::thread::scope(|s| -> Result<(), CacheError> {
            let mut unlinking: Option<std::thread::ScopedJoinHandle<'_, Result<(), StorageError>>> = None;
            let finish = |h: Option<std::thread::ScopedJoinHandle<'_, Result<(), StorageError>>>| {
                h.map_or(Ok(()), |h| crate::storage::joined(h.join(), "removing NARs"))
            };
            while self.space.usage() > target {
                let victims = self.index.least_recently_used(BATCH, now() - PENDING_GRACE_SECS)?;
                if victims.is_empty() {
                    break;
                }
                let before = evicted;
                evictor.renew();
                if self.index.is_shared() {
                    // Other replicas keep adding meanwhile: the shared totals say how far to go.
                    self.space.refresh(&*self.index);
                }
                let nars = self.evict_batch(&victims, target, &mut evicted)?;
                finish(unlinking.take())?;
                unlinking = Some(s.spawn(move || self.blobs.remove_nars(&nars)));
                if evicted == before {
                    break;
                }
            }
            Ok(finish(unlinking)?)
        })?;
        // Only NARs without narinfos are left to go: look for them after all.
        if pass == Pass::Quick && self.space.usage() > target {
            self.evict_unreferenced(target, &mut evicted)?;
        }
        span.set("ncps.eviction.narinfos", evicted.narinfos);
        span.set("ncps.eviction.nars", evicted.nars);
        span.set("ncps.eviction.bytes", evicted.bytes);
        if evicted.narinfos + evicted.nars > 0 {
            self.metrics.evicted(evicted.narinfos, evicted.nars, evicted.bytes);
            let secs = started.elapsed().as_secs_f64();
            log::info!(
                "evicted {} narinfo(s) and {} NAR(s), {} bytes in {secs:.2}s; the store now holds {} of {target} bytes",
                evicted.narinfos,
                evicted.nars,
                evicted.bytes,
                self.space.usage()
            );
        }
        Ok(evicted)
    }

    fn evict_unreferenced(&self, target: u64, evicted: &mut Evicted) -> Result<(), CacheError> {
        while self.space.usage() > target {
            let unreferenced = self.index.unreferenced_nars(BATCH)?;
            if unreferenced.is_empty() {
                break;
            }
            for (name, _) in unreferenced {
                if self.space.usage() <= target {
                    break;
                }
                let _writing = self.writing();
                if let Some(r) = self.index.remove_nar(&name)? {
                    self.remove_blobs(&[r], evicted, Narinfos::ToRemove)?;
                }
            }
        }
        Ok(())
    }

    /// Evicts from `victims` (in LRU order) until the store is at `target`, and returns the
    /// NARs whose blobs are left to remove (the index no longer has them).
    fn evict_batch(&self, victims: &[(StorePathHash, u64)], target: u64, tally: &mut Evicted) -> Result<Vec<NarName>, CacheError> {
        let _writing = self.writing();
        // Only as many as the excess needs. Each victim's size is the most its removal frees
        // (a shared NAR stays), so this never takes more than needed; a shortfall is made up
        // by the next batch.
        let excess = self.space.usage().saturating_sub(target);
        let mut chosen = Vec::with_capacity(victims.len());
        let mut freed_at_most = 0u64;
        for (hash, size) in victims {
            if freed_at_most >= excess {
                break;
            }
            freed_at_most += size;
            chosen.push(*hash);
        }
        // The narinfo blobs go while their index rows do (the unlinks wait for the disk, the
        // index uses a core: +13% at 100k on the root disk, DESIGN.md "A million entries"),
        // and both are done before any NAR blob goes, so a narinfo is never served once its
        // NAR may be gone. If a narinfo blob could not be removed, the batch's NAR blobs stay
        // too (without index rows: orphans, which fsck --repair and the check after an
        // unclean stop remove) and the pass stops with the error.
        let (unlinked, removed) = std::thread::scope(|s| {
            let unlinking = s.spawn(|| self.remove_narinfo_blobs(&chosen));
            let removed = self.index.remove_narinfos(&chosen);
            (crate::storage::joined(unlinking.join(), "removing narinfos"), removed)
        });
        let removed = removed?;
        let (_, nars) = self.account(&removed, tally, Narinfos::AlreadyGone);
        self.space.refresh(&*self.index);
        if let Err(e) = unlinked {
            log::warn!(
                "eviction: a narinfo file could not be removed ({e}), so the {} NAR file(s) of its batch stay, \
                 without index rows, until `ncps fsck --repair` (or the check after an unclean stop) removes them",
                nars.len()
            );
            return Err(e.into());
        }
        Ok(nars)
    }

    /// Counts what the index just dropped, and returns the blobs to remove: the narinfos (when
    /// `narinfos` says they are still there) and the NARs.
    fn account(&self, removed: &[Removed], tally: &mut Evicted, narinfos: Narinfos) -> (Vec<StorePathHash>, Vec<NarName>) {
        let mut freed = 0;
        let mut narinfo_blobs = Vec::new();
        let mut nar_blobs = Vec::new();
        for r in removed {
            for (hash, size) in &r.narinfos {
                if narinfos == Narinfos::ToRemove {
                    narinfo_blobs.push(*hash);
                }
                freed += size;
                tally.narinfos += 1;
            }
            if let Some((name, stored)) = &r.nar {
                nar_blobs.push(name.clone());
                if let Some(size) = stored {
                    freed += size;
                    tally.nars += 1;
                }
            }
        }
        tally.bytes += freed;
        self.space.add(0, freed);
        (narinfo_blobs, nar_blobs)
    }

    /// Deletes the blobs of what the index just dropped, narinfos before NARs as everywhere,
    /// and accounts for them.
    fn remove_blobs(&self, removed: &[Removed], tally: &mut Evicted, narinfos: Narinfos) -> Result<(), CacheError> {
        let (narinfo_blobs, nar_blobs) = self.account(removed, tally, narinfos);
        self.remove_narinfo_blobs(&narinfo_blobs)?;
        self.blobs.remove_nars(&nar_blobs)?;
        Ok(())
    }

    /// Removes narinfo blobs, then takes them out of the memo (even when a removal failed).
    /// After, not before: a hit that read a file just before it went cannot put it back
    /// (the memo refuses what a read began before a removal, `Memo::insert_read`), and one
    /// memoized earlier goes now, so no narinfo is served from the memo once its file is gone.
    fn remove_narinfo_blobs(&self, hashes: &[StorePathHash]) -> Result<(), StorageError> {
        let removed = self.blobs.remove_narinfos(hashes);
        for hash in hashes {
            self.narinfos.forget(hash);
        }
        removed
    }

    /// `DELETE /<hash>.narinfo`: removes it, and its NAR when nothing else uses it.
    pub fn delete_narinfo(&self, hash: &StorePathHash) -> Result<bool, CacheError> {
        let _writing = self.writing();
        self.remove_narinfo_blobs(std::slice::from_ref(hash))?;
        self.forget_missing(hash);
        match self.index.remove_narinfos(&[*hash])?.pop() {
            Some(r) => {
                self.remove_blobs(&[r], &mut Evicted::default(), Narinfos::AlreadyGone)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// `DELETE /nar/<name>`: removes it and every narinfo pointing at it.
    pub fn delete_nar(&self, name: &NarName) -> Result<bool, CacheError> {
        let _writing = self.writing();
        match self.index.remove_nar(name)? {
            Some(r) => {
                self.remove_blobs(&[r], &mut Evicted::default(), Narinfos::ToRemove)?;
                Ok(true)
            }
            None => {
                // Not indexed, but a stray blob of that name must not survive a DELETE.
                let existed = self.blobs.nar_len(name)?.is_some();
                self.blobs.remove_nar(name)?;
                Ok(existed)
            }
        }
    }
}
