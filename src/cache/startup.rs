//! What start-up checks, and when (DESIGN.md, "Start-up and crashes").
//!
//! Serving never depends on the index agreeing with the store: a blob under its final name is
//! complete and verified (staged, synced, then named), and a hit asks nothing else. So start-up
//! does only what takes constant time, and the port is served at once:
//! - staged files are removed (a crash's half-written downloads; never served);
//! - after a clean stop (the marker [`leave_marker`] wrote is there) store and index agree, and
//!   nothing else is checked;
//! - a replica's first start on a new data path beside a shared index and object store checks
//!   nothing either: it has written nothing (`Cache::joins_a_shared_store`);
//! - after anything else (a crash, a kill, a power cut, an older ncps) the store is compared
//!   with the index in the background, one shard at a time, and what disagrees is repaired:
//!   blobs the index does not vouch for go, rows whose blob is gone are dropped. Meanwhile the
//!   worst a disagreement can do is cost a miss or leave the size figure off: nothing
//!   unverified can be under a final name to be served.
//!
//! `ncps fsck` does the full check (re-hashing every NAR) on demand.
//!
//! An object store fails now and then (a Garage node restarting, a 503 `SlowDown`): the check
//! does not stop at the first failed request. A shard whose requests fail in a transient way
//! is tried again after a pause that doubles up to [`Backoff::cap`]; after
//! [`Backoff::attempts`] it is skipped (and named in the log) and the check goes on with the
//! next. Nothing is removed on the strength of a failed request: a shard is compared only once
//! both its listings are complete, so a failure means that shard is not repaired this time.

use super::check::{self, Problem};
use super::{Cache, CacheError};
use crate::index::now;
use crate::storage::shards;
use std::path::Path;
use std::time::{Duration, Instant};

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

/// How the background check waits out a store that fails: each step of the check (a shard)
/// is tried `attempts` times, after pauses from `first` doubling up to `cap`. Above the
/// store's own retries of each request (a second or two): this rides out a node that is down
/// for minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub attempts: u32,
    pub first: Duration,
    pub cap: Duration,
    /// After this many steps skipped in a row, the store is taken to be down and the check
    /// stops (it runs again after the next unclean stop; `ncps fsck` checks by hand).
    pub give_up_after: u32,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { attempts: 6, first: Duration::from_secs(1), cap: Duration::from_secs(30), give_up_after: 20 }
    }
}

impl Backoff {
    /// The pause after failed attempt `n` (1-based): `first`, doubled each time, at most `cap`.
    pub fn pause(&self, n: u32) -> Duration {
        self.first.saturating_mul(1u32 << (n.saturating_sub(1)).min(20)).min(self.cap)
    }

    /// Runs `step` until it succeeds, fails in a way that is not transient, or has been tried
    /// `attempts` times; `sleep` waits (a parameter, for the tests).
    pub fn run<T>(
        &self,
        what: &str,
        sleep: &mut dyn FnMut(Duration),
        mut step: impl FnMut() -> Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        let attempts = self.attempts.max(1);
        let mut n = 1;
        loop {
            match step() {
                Ok(v) => return Ok(v),
                Err(e) if n < attempts && is_transient(&e) => {
                    let pause = self.pause(n);
                    log::warn!(
                        "start-up check: {what}: {e} (attempt {n} of {attempts}); trying again in {:.1}s",
                        pause.as_secs_f64()
                    );
                    sleep(pause);
                    n += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// One step of the background check (a shard, or the keys outside every shard), tried again
/// as a whole when it fails.
type Step<'a> = Box<dyn Fn() -> Result<Fixed, CacheError> + 'a>;

/// Whether a failure of the check may pass: a request to the store that failed on the way.
fn is_transient(e: &CacheError) -> bool {
    matches!(e, CacheError::Storage(s) if s.is_transient())
}

impl Cache {
    /// The constant-time part, before the port is served. Returns whether the last stop was
    /// clean (then no background check is needed).
    pub(super) fn start_up(&self) -> Result<bool, CacheError> {
        // Another ncps serving the same data path may be writing its temp files now.
        let others = self.settings.peers.others();
        let temps = if others { None } else { Some(self.staging.clear()?) };
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
            None => String::from("temp files left to the ncps that writes them"),
            Some(0) => String::from("no temp file to clear"),
            Some(n) => format!("removed {n} temp file(s)"),
        };
        // A new data path holds nothing a crash could have left (nothing was written through
        // it yet); otherwise only a clean stop, or a check run to its end, vouches for the store.
        if clean || (self.settings.new_data_path && !others) {
            self.vouches.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if !clean && others {
            // Its blobs written and not yet recorded would look half-done to a comparison made
            // from here (its writes do not wait for this process's). Nor does this ncps vouch
            // for the store: whichever of them stops last without having checked leaves no
            // marker, so a start after both checks (a crash of a third would be found then).
            log::warn!(
                "start-up check: another ncps serves this data path, so the missing clean-stop marker \
                 may say it is running rather than that a stop was unclean; the store is not compared \
                 beside it (a start after both have stopped compares it); {temps}"
            );
            return Ok(true);
        }
        if !clean && self.joins_a_shared_store() {
            self.vouches.store(true, std::sync::atomic::Ordering::SeqCst);
            log::info!(
                "start-up check: a new data path beside a shared index and object store: this ncps has \
                 written nothing a crash could have left half-done, so the store is not compared (each \
                 replica compares after its own unclean stop; `ncps fsck` checks it all); {temps}"
            );
            return Ok(true);
        }
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

    /// A replica joining a fleet with a new data path (a new pod's empty volume): no marker,
    /// yet nothing of its own to check. What the check would find there is other replicas'
    /// business: blobs the shared index does not vouch for yet are left alone anyway, and rows
    /// whose blob is gone are for the replica whose crash left them, at its next start (or
    /// fsck). Without this, every new replica listed the whole bucket (100 s on a nearly empty
    /// Garage bucket). A local store is in the data path, so a new data path there is an empty
    /// store, and the check (quick then) drops the rows a shared index keeps for blobs that
    /// are gone with the old disk.
    fn joins_a_shared_store(&self) -> bool {
        self.settings.new_data_path && self.index.is_shared() && !self.blobs.reads_are_local()
    }

    /// The store check after an unclean stop, one shard at a time.
    pub(super) fn run_background_check(&self) {
        super::access::lower_priority(10);
        let started = Instant::now();
        let mut fixed = Fixed::default();
        let backoff = Backoff::default();
        let mut sleep = |d: Duration| std::thread::sleep(d);
        // What was skipped after its retries ran out, and why (the last failure).
        let mut skipped: Vec<(String, String)> = Vec::new();
        let mut in_a_row = 0u32;
        // Set when another ncps starts serving the data path during the check.
        let mut interrupted = false;
        let result = (|| -> Result<(), CacheError> {
            match self.index.check_integrity() {
                // Derived data, set right at once; the rest of the index is sound.
                Err(e) if e.is_derived_drift() => {
                    log::warn!("start-up check: {e}; recounting them");
                    self.index.mend_derived()?;
                }
                other => other?,
            }
            let mut steps: Vec<(String, Step<'_>)> = vec![
                ("the keys outside every shard".into(), Box::new(|| self.remove_strays_outside_shards())),
            ];
            if !self.index.is_shared() {
                steps.push(("the zstd copies".into(), Box::new(|| self.remove_zstd_copies())));
            }
            let shard_steps = shards().map(|shard| {
                let what = format!("shard {shard}");
                let step: Step<'_> = Box::new(move || self.check_shard(&shard));
                (what, step)
            });
            for (what, step) in steps.into_iter().chain(shard_steps) {
                if self.settings.peers.others() {
                    // Its blobs written and not yet recorded would look like a crash's leftovers.
                    log::warn!(
                        "start-up check: another ncps now serves this data path; the check stops before {what} \
                         (a start after both have stopped compares the store again)"
                    );
                    interrupted = true;
                    return Ok(());
                }
                match backoff.run(&what, &mut sleep, step) {
                    Ok(f) => {
                        in_a_row = 0;
                        fixed.removed += f.removed;
                        fixed.dropped += f.dropped;
                    }
                    Err(e) if is_transient(&e) => {
                        log::warn!("start-up check: {what} skipped: {e}; nothing of it was removed");
                        skipped.push((what, e.to_string()));
                        in_a_row += 1;
                        if in_a_row >= backoff.give_up_after.max(1) {
                            return Err(e);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        self.space.refresh(&*self.index);
        let secs = started.elapsed().as_secs_f64();
        let skipped_text = match skipped.len() {
            0 => String::new(),
            n => format!(
                "; skipped {n} part(s) the store did not answer for ({}): `ncps fsck` checks them by hand",
                skipped.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        if result.is_ok() && skipped.is_empty() && !interrupted {
            self.vouches.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        match result {
            Ok(()) if interrupted => {}
            Err(e) => log::error!(
                "start-up check: stopped after {secs:.1}s: {e}{skipped_text}; `ncps fsck` checks the store by hand"
            ),
            Ok(()) if fixed.removed + fixed.dropped == 0 && skipped.is_empty() => {
                log::info!("start-up check: done in {secs:.1}s: store and index agree")
            }
            Ok(()) if fixed.removed + fixed.dropped == 0 => {
                log::warn!("start-up check: done in {secs:.1}s: what was checked agrees{skipped_text}")
            }
            Ok(()) => log::warn!(
                "start-up check: done in {secs:.1}s: removed {} file(s) the index did not vouch for; \
                 dropped {} index entr(y/ies) whose file was missing{skipped_text}",
                fixed.removed,
                fixed.dropped
            ),
        }
        self.enforce_limit();
    }

    /// Removes what lies outside every shard (listed whole first: only then is anything removed).
    fn remove_strays_outside_shards(&self) -> Result<Fixed, CacheError> {
        let strays = {
            let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
            self.blobs.strays_outside_shards()?
        };
        for s in &strays {
            self.blobs.remove_stray(s)?;
        }
        Ok(Fixed { removed: strays.len(), dropped: 0 })
    }

    /// A crash may have left a copy its row does not count, or a row whose copy is gone;
    /// copies are an optimisation, made again when asked, so all go. Not with a shared index
    /// (the caller's test): the copies are every replica's.
    fn remove_zstd_copies(&self) -> Result<Fixed, CacheError> {
        let _no_writes = self.writes.write().unwrap_or_else(|p| p.into_inner());
        let rows = self.index.forget_nar_zstd()?;
        let files = self.blobs.remove_all_nar_zstd()?;
        if rows + files > 0 {
            log::info!("start-up check: removed {files} zstd cop(y/ies) ({rows} counted); made again when asked");
        }
        Ok(Fixed::default())
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

    /// Makes one problem go away (see [`repair`]), then forgets every memoized narinfo whose
    /// blob it removed, those of an uploaded NAR found missing or corrupt included (after
    /// the unlinks, as [`Cache::remove_narinfo_blobs`] does, so a racing read cannot put one back).
    fn repair(&self, p: &Problem) -> Result<(), CacheError> {
        for h in check::repair(&*self.blobs, &*self.index, p)? {
            self.narinfos.forget(&h);
        }
        Ok(())
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "s3")]
    use crate::storage::StorageError;

    #[cfg(feature = "s3")]
    fn remote_failure(status: u16) -> CacheError {
        let source = Box::new(crate::storage::s3::S3Error::Status { status, code: None });
        CacheError::Storage(StorageError::Remote { action: "listing", key: "nar/00".into(), source })
    }

    #[test]
    fn the_pause_doubles_from_the_first_up_to_the_cap() {
        let b = Backoff { attempts: 10, first: Duration::from_secs(1), cap: Duration::from_secs(30), give_up_after: 5 };
        let pauses: Vec<u64> = (1..=7).map(|n| b.pause(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.pause(u32::MAX), Duration::from_secs(30), "no overflow on a long outage");
    }

    #[cfg(feature = "s3")]
    #[test]
    fn a_transient_failure_is_tried_again_after_growing_pauses_until_it_passes() {
        let b = Backoff { attempts: 5, first: Duration::from_millis(100), cap: Duration::from_millis(250), give_up_after: 5 };
        let mut slept = Vec::new();
        let mut calls = 0;
        let got = b.run("shard 00", &mut |d| slept.push(d.as_millis()), || {
            calls += 1;
            if calls < 4 { Err(remote_failure(503)) } else { Ok(calls) }
        });
        assert_eq!(got.ok(), Some(4));
        assert_eq!(slept, [100, 200, 250]);
    }

    #[cfg(feature = "s3")]
    #[test]
    fn a_failure_that_will_not_pass_is_not_tried_again_and_retries_are_bounded() {
        let b = Backoff { attempts: 3, first: Duration::from_millis(1), cap: Duration::from_millis(1), give_up_after: 5 };
        let mut calls = 0;
        let got: Result<(), _> = b.run("shard 00", &mut |_| {}, || {
            calls += 1;
            Err(remote_failure(403))
        });
        assert!(got.is_err() && calls == 1, "403 is the request's fault: {calls} call(s)");
        calls = 0;
        let got: Result<(), _> = b.run("shard 00", &mut |_| {}, || {
            calls += 1;
            Err(remote_failure(500))
        });
        assert!(matches!(got, Err(ref e) if is_transient(e)) && calls == 3, "{calls} call(s)");
    }
}
