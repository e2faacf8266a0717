//! Single-flight: one upstream fetch per key, however many requests want it.
//!
//! Two shapes, for the two kinds of miss:
//! - [`SingleFlight`] for small answers (narinfos): the first caller computes, the others wait
//!   for the same result.
//! - [`Download`] for NARs: one thread writes the file while any number of readers send what is
//!   already written, so every client gets bytes as they arrive, not after the download ends.
//!   Readers are never given the last byte before the whole file is verified: a client cannot
//!   see a complete response for bytes that turned out to be wrong.

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one computation per key at a time; concurrent callers share its result.
pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, Arc<Call<V>>>>,
}

struct Call<V> {
    result: Mutex<Option<V>>,
    done: Condvar,
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        SingleFlight { calls: Mutex::new(HashMap::new()) }
    }

    /// Returns `compute()`'s result, computing it only if no other caller is already doing so
    /// for `key`. Returns also whether this caller was the one that computed.
    ///
    /// ```
    /// use ncps::flight::SingleFlight;
    /// let sf: SingleFlight<&str, u32> = SingleFlight::new();
    /// assert_eq!(sf.run("k", || 7), (7, true));
    /// ```
    pub fn run(&self, key: K, compute: impl FnOnce() -> V) -> (V, bool) {
        let (call, leader) = {
            let mut calls = lock(&self.calls);
            match calls.get(&key) {
                Some(c) => (c.clone(), false),
                None => {
                    let c = Arc::new(Call { result: Mutex::new(None), done: Condvar::new() });
                    calls.insert(key.clone(), c.clone());
                    (c, true)
                }
            }
        };
        if leader {
            // Removes the entry even if compute() panics, so the key is not stuck forever.
            struct Cleanup<'a, K: Hash + Eq, V>(&'a Mutex<HashMap<K, Arc<Call<V>>>>, Option<K>);
            impl<K: Hash + Eq, V> Drop for Cleanup<'_, K, V> {
                fn drop(&mut self) {
                    if let Some(k) = self.1.take() {
                        lock(self.0).remove(&k);
                    }
                }
            }
            let cleanup = Cleanup(&self.calls, Some(key));
            let v = compute();
            *lock(&call.result) = Some(v.clone());
            drop(cleanup);
            call.done.notify_all();
            return (v, true);
        }
        let mut result = lock(&call.result);
        loop {
            if let Some(v) = result.as_ref() {
                return (v.clone(), false);
            }
            let (r, timeout) = call
                .done
                .wait_timeout(result, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner());
            result = r;
            // The leader panicked (its entry is gone and no result came): compute alone.
            if timeout.timed_out() && result.is_none() && !lock(&self.calls).contains_key(&key) {
                drop(result);
                return (compute(), true);
            }
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// A NAR being downloaded into a temp file, shared by its readers.
pub struct Download {
    file: File,
    total: u64,
    state: Mutex<State>,
    changed: Condvar,
    /// Readers give up when nothing has been written for this long (the writer has its own,
    /// shorter, upstream timeouts; this is the backstop).
    stall_limit: Duration,
}

struct State {
    written: u64,
    last_progress: Instant,
    /// `Some(Ok)` once the whole file is verified; `Some(Err)` when the download failed.
    outcome: Option<Result<(), String>>,
}

impl Download {
    /// `file` is a handle on the temp file the writer fills; `total` is the verified length
    /// the file must reach.
    pub fn new(file: File, total: u64, stall_limit: Duration) -> Download {
        Download {
            file,
            total,
            state: Mutex::new(State { written: 0, last_progress: Instant::now(), outcome: None }),
            changed: Condvar::new(),
            stall_limit,
        }
    }

    /// Writer: this many bytes are now in the file.
    pub fn progress(&self, written: u64) {
        let mut s = lock(&self.state);
        s.written = written;
        s.last_progress = Instant::now();
        drop(s);
        self.changed.notify_all();
    }

    /// Writer: the download ended, verified (`Ok`) or not.
    pub fn finish(&self, outcome: Result<(), String>) {
        lock(&self.state).outcome = Some(outcome);
        self.changed.notify_all();
    }

    /// Whether the download ended, and how.
    pub fn outcome(&self) -> Option<Result<(), String>> {
        lock(&self.state).outcome.clone()
    }

    /// Reader: blocks until more than `sent` bytes may be sent; returns how many may be sent
    /// in all. The last byte is held back until the file is verified.
    pub fn wait(&self, sent: u64) -> Result<u64, String> {
        let mut s = lock(&self.state);
        loop {
            match &s.outcome {
                Some(Ok(())) => return Ok(self.total),
                Some(Err(e)) => return Err(e.clone()),
                None => {}
            }
            let allowed = s.written.min(self.total.saturating_sub(1));
            if allowed > sent {
                return Ok(allowed);
            }
            if s.last_progress.elapsed() > self.stall_limit {
                return Err(format!("download stalled for {:?}", self.stall_limit));
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A reader's view of a [`Download`], as an HTTP body.
pub struct DownloadBody(pub Arc<Download>);

impl crate::http::Growing for DownloadBody {
    fn len(&self) -> u64 {
        self.0.total
    }
    fn file(&self) -> &File {
        &self.0.file
    }
    fn wait(&self, sent: u64) -> Result<u64, String> {
        self.0.wait(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn concurrent_callers_share_one_computation() {
        let sf = Arc::new(SingleFlight::<u32, u32>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (sf, runs) = (sf.clone(), runs.clone());
                std::thread::spawn(move || {
                    sf.run(1, || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(200));
                        42
                    })
                    .0
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 42);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    fn download(total: u64) -> Download {
        let f = File::open("/dev/null").unwrap();
        Download::new(f, total, Duration::from_secs(5))
    }

    #[test]
    fn readers_get_bytes_as_they_arrive_but_not_the_last_before_verification() {
        let d = download(10);
        d.progress(4);
        assert_eq!(d.wait(0), Ok(4));
        d.progress(10);
        assert_eq!(d.wait(4), Ok(9), "the last byte waits for the hash check");
        d.finish(Ok(()));
        assert_eq!(d.wait(9), Ok(10));
    }

    #[test]
    fn a_failed_download_fails_its_readers() {
        let d = download(10);
        d.progress(10);
        d.finish(Err("hash mismatch".into()));
        assert_eq!(d.wait(9), Err("hash mismatch".to_string()));
    }
}
