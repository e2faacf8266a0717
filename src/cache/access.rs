//! Last-use times for the LRU order, collected in memory and written in one index transaction
//! every 30 s, before every eviction pass, at a clean stop, and whenever [`FLUSH_AT`] entries
//! are waiting (so memory stays bounded when hits spread over a million entries). A hit never
//! writes to the index itself.

use super::{lock, Cache, CacheError};
use crate::index::now;
use crate::nix::{NarName, StorePathHash};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Waiting entries that make the recorder write at once.
const FLUSH_AT: usize = 32 * 1024;
/// Waiting entries past which new uses are not recorded (counted, and said in the log): the
/// recorder runs at the lowest priority, and serving matters more than LRU precision.
const PENDING_MAX: usize = 4 * FLUSH_AT;
/// The recorder's period otherwise.
const PERIOD: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Maps {
    narinfos: HashMap<StorePathHash, i64>,
    nars: HashMap<NarName, i64>,
}

#[derive(Default)]
pub(super) struct Touched {
    maps: Mutex<Maps>,
    full: Mutex<bool>,
    wake: Condvar,
    /// Uses not recorded because [`PENDING_MAX`] were waiting.
    dropped: std::sync::atomic::AtomicU64,
}

impl Touched {
    fn note_size(&self, len: usize) {
        if len == FLUSH_AT {
            *lock(&self.full) = true;
            self.wake.notify_one();
        }
    }
}

/// Lowers the calling thread's priority (`nice`): background work yields to serving.
pub(super) fn lower_priority(nice: i32) {
    // SAFETY: gettid has no arguments; setpriority with PRIO_PROCESS and a thread id changes
    // only that thread's nice value (Linux).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

impl Cache {
    pub(super) fn touch_narinfo(&self, hash: &StorePathHash) {
        let len = {
            let mut maps = lock(&self.access.maps);
            if maps.narinfos.len() >= PENDING_MAX && !maps.narinfos.contains_key(hash) {
                self.access.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            maps.narinfos.insert(*hash, now());
            maps.narinfos.len()
        };
        self.access.note_size(len);
    }

    pub(super) fn touch_nar(&self, name: &NarName) {
        let len = {
            let mut maps = lock(&self.access.maps);
            if maps.nars.len() >= PENDING_MAX && !maps.nars.contains_key(name) {
                self.access.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            maps.nars.insert(name.clone(), now());
            maps.nars.len()
        };
        self.access.note_size(len);
    }

    /// Writes the batched access times.
    pub fn flush_access_times(&self) -> Result<(), CacheError> {
        let _writing = self.writing();
        self.flush_access_times_locked()
    }

    /// As [`Cache::flush_access_times`], for a caller that holds the write lock.
    pub(super) fn flush_access_times_locked(&self) -> Result<(), CacheError> {
        let maps = std::mem::take(&mut *lock(&self.access.maps));
        if maps.narinfos.is_empty() && maps.nars.is_empty() {
            return Ok(());
        }
        // In key order: neighbouring rows share index pages, so fewer pages are read and written.
        let mut narinfos: Vec<_> = maps.narinfos.into_iter().collect();
        narinfos.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut nars: Vec<_> = maps.nars.into_iter().collect();
        nars.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        self.index.touch(&narinfos, &nars)?;
        let dropped = self.access.dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("{dropped} use(s) of cached entries were not recorded for the LRU order: more came than the recorder could write");
        }
        Ok(())
    }

    /// The recorder thread.
    pub(super) fn run_access_recorder(&self) {
        lower_priority(19);
        loop {
            {
                let full = lock(&self.access.full);
                let (mut full, _) =
                    self.access.wake.wait_timeout_while(full, PERIOD, |f| !*f).unwrap_or_else(|p| p.into_inner());
                *full = false;
            }
            if let Err(e) = self.flush_access_times() {
                log::warn!("recording access times: {e}");
            }
        }
    }
}
