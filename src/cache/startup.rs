//! What start-up checks, and when (DESIGN.md, "Start-up and crashes").
//!
//! Serving never depends on the index agreeing with the store: a blob under its final name is
//! complete and verified (staged, synced, then named), and a hit asks nothing else. So start-up
//! does only what takes constant time, and the port is served at once:
//! - staged files are removed (a crash's half-written downloads; never served);
//! - after a clean stop (the marker [`leave_marker`] wrote is there) store and index agree, and
//!   nothing else is checked;
//! - after anything else (a crash, a kill, a power cut, an older ncps) the store is compared
//!   with the index in the background, one shard at a time, and what disagrees is repaired:
//!   blobs the index does not vouch for go, rows whose blob is gone are dropped. Meanwhile the
//!   worst a disagreement can do is cost a miss or leave the size figure off: nothing
//!   unverified can be under a final name to be served.
//!
//! `ncps fsck` does the full check (re-hashing every NAR) on demand.

use super::check::{self, Problem};
use super::{Cache, CacheError};
use crate::index::now;
use crate::storage::shards;
use std::path::Path;
use std::time::Instant;

/// Writes the clean-stop marker (synced, so it survives the power cut that follows a stop).
pub(super) fn leave_marker(path: &Path) -> Result<(), std::io::Error> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    writeln!(f, "ncps stopped cleanly at {}", now())?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What a repair of one shard did.
#[derive(Debug, Default, Clone, Copy)]
struct Fixed {
    removed: usize,
    dropped: usize,
}

impl Cache {
    /// The constant-time part, before the port is served. Returns whether the last stop was
    /// clean (then no background check is needed).
    pub(super) fn start_up(&self) -> Result<bool, CacheError> {
        let temps = self.staging.clear()?;
        let marker = &self.settings.clean_marker;
        let clean = marker.exists();
        if clean {
            // From now on a crash must be seen as one: the marker goes before anything is
            // written. If it cannot go, every start checks the store (safe, just slower).
            if let Err(e) = std::fs::remove_file(marker) {
                log::warn!("removing {}: {e}; the store will be checked at every start", marker.display());
                return Ok(false);
            }
        }
        self.space.refresh(&*self.index);
        let temps = match temps {
            0 => String::from("no temp file to clear"),
            n => format!("removed {n} temp file(s)"),
        };
        if clean {
            log::info!("start-up check: the last stop was clean, so store and index agree; {temps}");
        } else {
            log::warn!(
                "start-up check: the last stop was not clean; {temps}; comparing the store with the \
                 index in the background"
            );
        }
        Ok(clean)
    }

    /// The store check after an unclean stop, one shard at a time.
    pub(super) fn run_background_check(&self) {
        super::access::lower_priority(10);
        let started = Instant::now();
        let mut fixed = Fixed::default();
        let result = (|| -> Result<(), CacheError> {
            self.index.check_integrity()?;
            let strays = {
                let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
                self.blobs.strays_outside_shards()?
            };
            fixed.removed += strays.len();
            for s in &strays {
                self.blobs.remove_stray(s)?;
            }
            if !self.index.is_shared() {
                // A crash may have left a copy its row does not count, or a row whose copy is
                // gone; copies are an optimisation, made again when asked, so all go. Not with
                // a shared index: the copies are every replica's.
                let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
                let rows = self.index.forget_nar_zstd()?;
                let files = self.blobs.remove_all_nar_zstd()?;
                if rows + files > 0 {
                    log::info!("start-up check: removed {files} zstd cop(y/ies) ({rows} counted); made again when asked");
                }
            }
            for shard in shards() {
                let f = self.check_shard(&shard)?;
                fixed.removed += f.removed;
                fixed.dropped += f.dropped;
            }
            Ok(())
        })();
        self.space.refresh(&*self.index);
        let secs = started.elapsed().as_secs_f64();
        match result {
            Err(e) => log::error!("start-up check: stopped after {secs:.1}s: {e}; `ncps fsck` checks the store by hand"),
            Ok(()) if fixed.removed + fixed.dropped == 0 => {
                log::info!("start-up check: done in {secs:.1}s: store and index agree")
            }
            Ok(()) => log::warn!(
                "start-up check: done in {secs:.1}s: removed {} file(s) the index did not vouch for; \
                 dropped {} index entr(y/ies) whose file was missing",
                fixed.removed,
                fixed.dropped
            ),
        }
        self.enforce_limit();
    }

    /// Compares and repairs one shard, with every write waiting meanwhile (a few milliseconds
    /// for a thousand entries): a write is never seen half-way between its row and its blob.
    fn check_shard(&self, shard: &str) -> Result<Fixed, CacheError> {
        let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
        // Rows first, then blobs: a blob is written before its row, so a row read here has
        // its blob in the listing that follows, even while another replica sharing the index
        // writes (the lock above is only this process's).
        let indexed_narinfos = self.index.narinfos_in_shard(shard)?;
        let indexed_nars = self.index.nars_in_shard(shard)?;
        let narinfos = self.blobs.list_narinfos(shard)?;
        let nars = self.blobs.list_nars(shard)?;
        let mut problems: Vec<Problem> = narinfos.strays.into_iter().chain(nars.strays).map(Problem::Stray).collect();
        problems.extend(check::narinfo_shard(&narinfos.entries, &indexed_narinfos));
        problems.extend(check::nar_shard(&nars.entries, &indexed_nars));
        if self.index.is_shared() {
            // Another replica may be between writing a blob and recording it: a blob the
            // index does not vouch for yet is left (it was verified before it was written);
            // only rows whose blob is gone are dropped.
            let before = problems.len();
            problems.retain(|p| matches!(p, Problem::MissingNarinfo(_) | Problem::MissingNar(_)));
            if before > problems.len() {
                log::info!(
                    "start-up check: shard {shard}: {} blob(s) the shared index does not vouch for left in place",
                    before - problems.len()
                );
            }
        }
        let mut fixed = Fixed::default();
        if problems.is_empty() {
            return Ok(fixed);
        }
        for p in &problems {
            match p {
                Problem::MissingNarinfo(_) | Problem::MissingNar(_) => fixed.dropped += 1,
                _ => fixed.removed += 1,
            }
            match p {
                // Only the row, as a write that died between row and blob left it; its NAR
                // may be wanted by another narinfo or an upload.
                Problem::MissingNarinfo(h) => self.index.delete_narinfo_row(h)?,
                p => self.repair(p)?,
            }
        }
        Ok(fixed)
    }

    /// Makes one problem go away (see [`repair`]), forgetting memoized narinfos it touched.
    fn repair(&self, p: &Problem) -> Result<(), CacheError> {
        check::repair(&*self.blobs, &*self.index, p)?;
        if let Problem::MissingNarinfo(h) | Problem::OrphanNarinfo(h) | Problem::CorruptNarinfo(h, _) = p {
            self.narinfos.forget(h);
        }
        Ok(())
    }
}

