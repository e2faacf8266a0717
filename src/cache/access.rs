//! Last-use times for the LRU order, collected in memory and written in one index transaction
//! every 30 s, before every eviction pass, at a clean stop, and whenever [`FLUSH_AT`] entries
//! are waiting (so memory stays bounded when hits spread over a million entries). A hit never
//! writes to the index itself.
//!
//! A narinfo's use is taken down once per [`RECENT_WINDOW`] at most: a client that checks the
//! same closure again and again (a CI box before every build) costs the recorder nothing after
//! its first round. [`Recent`] remembers the narinfos already taken down, in two bit sets of
//! fixed size (2 MiB in all, whatever the store holds). The LRU order is then exact to two
//! windows (two minutes), which is nothing beside the days an entry waits to be evicted. In
//! the 100k-entry spread benchmark the recorder had 16% of ncps's CPU samples before
//! (DESIGN.md, "A million entries").

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
/// How long a narinfo's use, once taken down, stands for its later uses (seconds).
const RECENT_WINDOW: i64 = 60;
/// Bits in each of [`Recent`]'s two sets (1 MiB each). With 100k different narinfos used in a
/// window, 1.2% of the others are taken for used already (and their use goes down in a later
/// window); with a million, 11%.
const RECENT_BITS: usize = 1 << 23;

/// The narinfos whose use was taken down in this window or the one before, as a pair of bit
/// sets indexed by a hash of the store path hash. A false "yes" costs one use not taken down;
/// there is never a false "no". Pure: time comes in as an argument.
pub(super) struct Recent {
    sets: [Vec<u64>; 2],
    /// Which of `sets` is this window's.
    current: usize,
    /// When this window began (seconds).
    since: i64,
}

impl Default for Recent {
    fn default() -> Recent {
        // No window yet: the first use begins one.
        Recent { sets: [Vec::new(), Vec::new()], current: 0, since: i64::MIN }
    }
}

impl Recent {
    fn bit(hash: &StorePathHash) -> (usize, u64) {
        // FNV-1a over the 32 nix32 characters (already uniform; this only folds them).
        let h = hash.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let i = (h >> 7) as usize % RECENT_BITS;
        (i / 64, 1 << (i % 64))
    }

    /// Whether `hash`'s use was taken down in this window or the one before.
    pub(super) fn seen(&mut self, hash: &StorePathHash, now: i64) -> bool {
        if now.saturating_sub(self.since) >= RECENT_WINDOW {
            // A new window: the one before is forgotten (two windows past), the current one
            // becomes the one before. After a long pause both are stale. A forgotten set's
            // memory goes back to the system, so an idle cache holds none.
            let stale = now.saturating_sub(self.since) >= 2 * RECENT_WINDOW;
            self.current ^= 1;
            for set in if stale { &mut self.sets[..] } else { std::slice::from_mut(&mut self.sets[self.current]) } {
                *set = Vec::new();
            }
            self.since = now;
        }
        let (word, mask) = Self::bit(hash);
        self.sets.iter().any(|set| set.get(word).is_some_and(|w| w & mask != 0))
    }

    /// Counts `hash`'s use as taken down in this window.
    pub(super) fn mark(&mut self, hash: &StorePathHash) {
        let (word, mask) = Self::bit(hash);
        let set = &mut self.sets[self.current];
        if set.is_empty() {
            // Zeroed memory from the allocator: its pages are only touched as bits are set.
            *set = vec![0; RECENT_BITS / 64];
        }
        set[word] |= mask;
    }
}

#[derive(Default)]
struct Maps {
    narinfos: HashMap<StorePathHash, i64>,
    nars: HashMap<NarName, i64>,
    recent: Recent,
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
            let now = now();
            let mut maps = lock(&self.access.maps);
            if maps.recent.seen(hash, now) {
                return;
            }
            if maps.narinfos.len() >= PENDING_MAX && !maps.narinfos.contains_key(hash) {
                // Not marked: the next use may get in.
                self.access.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            maps.recent.mark(hash);
            maps.narinfos.insert(*hash, now);
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
        let (narinfos, nars) = {
            let mut maps = lock(&self.access.maps);
            (std::mem::take(&mut maps.narinfos), std::mem::take(&mut maps.nars))
        };
        if narinfos.is_empty() && nars.is_empty() {
            return Ok(());
        }
        // In key order: neighbouring rows share index pages, so fewer pages are read and written.
        let mut narinfos: Vec<_> = narinfos.into_iter().collect();
        narinfos.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut nars: Vec<_> = nars.into_iter().collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A store path hash made from `i`: 20 well-mixed bytes (splitmix64), in nix32.
    fn hash(i: u32) -> StorePathHash {
        let mut x = u64::from(i);
        let mut bytes = [0u8; 20];
        for chunk in bytes.chunks_mut(8) {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..chunk.len()]);
        }
        StorePathHash::parse(&crate::nix::nix32::encode(&bytes)).expect("a nix32 hash")
    }

    #[test]
    fn a_use_is_taken_down_once_per_window_and_again_in_a_later_one() {
        let mut r = Recent::default();
        let h = hash(1);
        assert!(!r.seen(&h, 1000), "the first use is taken down");
        assert!(!r.seen(&h, 1000), "and until it is marked, so is the next (a dropped use)");
        r.mark(&h);
        assert!(r.seen(&h, 1000 + RECENT_WINDOW - 1), "again within the window: not");
        // The window turned, but the use stands for the window after its own.
        assert!(r.seen(&h, 1000 + RECENT_WINDOW), "in the next window the last one still counts");
        assert!(!r.seen(&h, 1000 + 2 * RECENT_WINDOW), "two windows on it is taken down again");
        r.mark(&h);
        assert!(!r.seen(&h, 1000 + 10 * RECENT_WINDOW), "after a long pause too");
        assert!(r.sets.iter().all(Vec::is_empty), "a long pause leaves no memory held");
    }

    #[test]
    fn the_recent_set_never_says_no_for_a_use_it_took_down_and_rarely_yes_for_others() {
        let mut r = Recent::default();
        for i in 0..100_000 {
            r.seen(&hash(i), 5);
            r.mark(&hash(i));
        }
        assert!((0..100_000).all(|i| r.seen(&hash(i), 5)), "no false no");
        let false_yes = (100_000..110_000).filter(|&i| r.seen(&hash(i), 5)).count();
        assert!(false_yes < 300, "{false_yes} of 10,000 others taken for used (about 1.2% expected)");
    }
}
