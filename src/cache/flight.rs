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

use crate::http::{Chunk, Interrupted};

/// Why a download ended, shared by all its readers.
pub type Outcome = Result<(), Arc<dyn std::error::Error + Send + Sync>>;

/// How relaying a download to its readers can fail on its own account.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayError {
    /// The disk refused bytes and no client waits for them: nothing to relay to.
    NoReaders,
    /// The disk refused bytes and the slowest client read nothing for this long.
    SlowestReaderStalled(Duration),
    /// Nothing arrived from upstream for this long.
    Stalled(Duration),
    /// The disk is full and bytes this reader still needs were already dropped from memory.
    BytesDropped,
    /// No client waits for this download, and it got only `bytes` in `window`.
    NoProgress { bytes: u64, window: Duration },
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::NoReaders => f.write_str("the disk is full and no client is waiting for this download"),
            RelayError::SlowestReaderStalled(d) => write!(f, "the slowest client read nothing for {d:?}"),
            RelayError::Stalled(d) => write!(f, "download stalled for {d:?}"),
            RelayError::BytesDropped => f.write_str("the disk is full and these bytes are no longer held"),
            RelayError::NoProgress { bytes, window } => write!(
                f,
                "no client waits for this download and it got only {bytes} bytes in {:.0}s; its slot goes back",
                window.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for RelayError {}

fn failed(e: RelayError) -> Interrupted {
    Interrupted::Failed(Arc::new(e))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs one computation per key at a time; concurrent callers share its result.
///
/// A computation can be given up once nobody wants its result ([`SingleFlight::run_while`]):
/// each caller is counted while it waits, and leaves the count when its client goes away.
pub struct SingleFlight<K, V> {
    calls: Mutex<HashMap<K, Arc<Call<V>>>>,
}

struct Call<V> {
    result: Mutex<Option<V>>,
    done: Condvar,
    /// Callers still waiting for the result (the one computing included). Joined only under
    /// the `calls` lock, and the call is given up only under it, so a caller that joins is
    /// never handed a result nobody computed for it.
    interested: std::sync::atomic::AtomicUsize,
}

/// The caller of [`SingleFlight::run_while`] left before the result came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left;

/// How often a waiting caller asks whether its client is still there.
const LOOK_EVERY: Duration = Duration::from_millis(200);

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    pub fn new() -> Self {
        SingleFlight { calls: Mutex::new(HashMap::new()) }
    }

    /// Returns `compute()`'s result, computing it only if no other caller is already doing so
    /// for `key`. Returns also whether this caller was the one that computed.
    ///
    /// ```
    /// use ncps::cache::flight::SingleFlight;
    /// let sf: SingleFlight<&str, u32> = SingleFlight::new();
    /// assert_eq!(sf.run("k", || 7), (7, true));
    /// ```
    pub fn run(&self, key: K, compute: impl FnOnce() -> V) -> (V, bool) {
        match self.run_while(key, &|| false, |_| compute()) {
            Ok(r) => r,
            // Unreachable: a caller whose client never leaves never leaves.
            Err(Left) => unreachable!("a caller that cannot leave left"),
        }
    }

    /// As [`SingleFlight::run`], for a caller whose client may leave: `gone` says whether it
    /// has. A waiting caller asks it every 200 ms and returns `Err(Left)` once it says yes.
    /// The one computing is handed `abandoned`, to ask between steps: it says yes once every
    /// caller has left, and then the call is already forgotten (a caller arriving later
    /// starts afresh), so the computation should stop; its result goes to nobody.
    pub fn run_while(
        &self,
        key: K,
        gone: &dyn Fn() -> bool,
        compute: impl FnOnce(&dyn Fn() -> bool) -> V,
    ) -> Result<(V, bool), Left> {
        use std::sync::atomic::Ordering::SeqCst;
        let (call, leader) = {
            let mut calls = lock(&self.calls);
            match calls.get(&key) {
                Some(c) => {
                    c.interested.fetch_add(1, SeqCst);
                    (c.clone(), false)
                }
                None => {
                    let c = Arc::new(Call {
                        result: Mutex::new(None),
                        done: Condvar::new(),
                        interested: std::sync::atomic::AtomicUsize::new(1),
                    });
                    calls.insert(key.clone(), c.clone());
                    (c, true)
                }
            }
        };
        if leader {
            // Removes the entry even if compute() panics, so the key is not stuck forever;
            // only its own (an abandoned call's key may belong to a newer call by then).
            struct Cleanup<'a, K: Hash + Eq, V>(&'a Mutex<HashMap<K, Arc<Call<V>>>>, Option<K>, &'a Arc<Call<V>>);
            impl<K: Hash + Eq, V> Drop for Cleanup<'_, K, V> {
                fn drop(&mut self) {
                    if let Some(k) = self.1.take() {
                        let mut calls = lock(self.0);
                        if calls.get(&k).is_some_and(|c| Arc::ptr_eq(c, self.2)) {
                            calls.remove(&k);
                        }
                    }
                }
            }
            let cleanup = Cleanup(&self.calls, Some(key.clone()), &call);
            let left = std::cell::Cell::new(false);
            let abandoned = || {
                if !left.get() && gone() {
                    left.set(true);
                    call.interested.fetch_sub(1, SeqCst);
                }
                if call.interested.load(SeqCst) > 0 {
                    return false;
                }
                let mut calls = lock(&self.calls);
                if call.interested.load(SeqCst) > 0 {
                    return false;
                }
                if calls.get(&key).is_some_and(|c| Arc::ptr_eq(c, &call)) {
                    calls.remove(&key);
                }
                true
            };
            let v = compute(&abandoned);
            *lock(&call.result) = Some(v.clone());
            drop(cleanup);
            call.done.notify_all();
            return Ok((v, true));
        }
        let mut result = lock(&call.result);
        loop {
            if let Some(v) = result.as_ref() {
                return Ok((v.clone(), false));
            }
            let (r, timeout) = call.done.wait_timeout(result, LOOK_EVERY).unwrap_or_else(|p| p.into_inner());
            result = r;
            if result.is_some() {
                continue;
            }
            if gone() {
                call.interested.fetch_sub(1, SeqCst);
                return Err(Left);
            }
            // The leader panicked (its entry is gone and no result came): compute alone.
            if timeout.timed_out() && !lock(&self.calls).get(&key).is_some_and(|c| Arc::ptr_eq(c, &call)) {
                drop(result);
                return Ok((compute(&|| gone()), true));
            }
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// NARs up to this size reach clients only once verified.
const HOLD_WHOLE_UP_TO: u64 = 1 << 20;

/// How much a download may hold in memory when the disk refuses its bytes, before it waits
/// for its slowest reader.
const SPILL_MAX: usize = 8 << 20;

/// Readers are woken for new bytes once this many have come since the last wake-up, or once
/// [`WAKE_AFTER`] has passed. From a fast upstream bytes come in chunks of 128 KiB every
/// ~100 µs; waking every reader for each of them cost more CPU than the sending did (a
/// futex wake, a context switch, a sendfile and two setsockopt calls per 128 KiB).
const WAKE_EVERY_BYTES: u64 = 1 << 20;
const WAKE_AFTER: Duration = Duration::from_millis(5);

/// How long a reader sleeps at most between looks: bounds how late it sees bytes whose
/// wake-up was saved (a burst that ended within [`WAKE_AFTER`] of the last wake-up).
const READER_NAP: Duration = Duration::from_millis(100);

/// A NAR being downloaded into a temp file, shared by its readers.
///
/// Normally every byte goes to the file and readers send from it. If the file stops taking
/// bytes (a full disk), the rest of the download is relayed through a bounded buffer in memory
/// instead: the clients already waiting still get every byte, and nothing is kept.
pub struct Download {
    file: File,
    total: u64,
    state: Mutex<State>,
    changed: Condvar,
    /// Readers give up when nothing has been written for this long (the writer has its own,
    /// shorter, upstream timeouts; this is the backstop).
    stall_limit: Duration,
    /// The span of the download (OpenTelemetry): requests that join it link to it.
    pub span: Option<crate::otel::SpanContext>,
    /// The client address whose request started it (its share of the download slots).
    pub started_by: Option<std::net::IpAddr>,
}

struct State {
    /// Bytes received so far.
    written: u64,
    /// Bytes `0..on_disk` are in the file; the rest, if any, are in `spill`.
    on_disk: u64,
    spill: std::collections::VecDeque<u8>,
    /// Offset of `spill[0]`.
    spill_start: u64,
    spilling: bool,
    /// Each reader's position, so spilled bytes are dropped only once everyone has them.
    readers: HashMap<u64, u64>,
    next_reader: u64,
    last_progress: Instant,
    /// `written` at the last wake-up of the readers, and when that was.
    announced: u64,
    announced_at: Instant,
    /// `Some(Ok)` once the whole file is verified; `Some(Err)` when the download failed.
    outcome: Option<Outcome>,
}

impl Download {
    /// `file` is a handle on the temp file the writer fills; `total` is the verified length
    /// the file must reach.
    pub fn new(file: File, total: u64, stall_limit: Duration) -> Download {
        Download {
            file,
            total,
            state: Mutex::new(State {
                written: 0,
                on_disk: 0,
                spill: std::collections::VecDeque::new(),
                spill_start: 0,
                spilling: false,
                readers: HashMap::new(),
                next_reader: 0,
                last_progress: Instant::now(),
                announced: 0,
                announced_at: Instant::now(),
                outcome: None,
            }),
            changed: Condvar::new(),
            stall_limit,
            span: None,
            started_by: None,
        }
    }

    /// The same, with the span the download will run under.
    pub fn traced(mut self, span: Option<crate::otel::SpanContext>) -> Download {
        self.span = span;
        self
    }

    /// Records the client address that started this download.
    pub fn started_by(mut self, client: std::net::IpAddr) -> Download {
        self.started_by = Some(client);
        self
    }

    /// Writer: this many bytes are now in the file.
    pub fn progress(&self, written: u64) {
        let mut s = lock(&self.state);
        let now = Instant::now();
        s.written = written;
        s.on_disk = written;
        s.last_progress = now;
        // The first bytes always wake the readers: their time to first byte is not traded.
        let first = s.announced == 0;
        if !first && written - s.announced < WAKE_EVERY_BYTES && now.duration_since(s.announced_at) < WAKE_AFTER {
            return;
        }
        s.announced = written;
        s.announced_at = now;
        drop(s);
        self.changed.notify_all();
    }

    /// Whether any client follows this download.
    pub fn has_readers(&self) -> bool {
        !lock(&self.state).readers.is_empty()
    }

    /// Writer: still at work though no byte came (it is asking another upstream for the
    /// rest), so readers do not give up on a stall.
    pub fn alive(&self) {
        lock(&self.state).last_progress = Instant::now();
    }

    /// Writer: the file refused these bytes (and all later ones); relay them from memory.
    /// Blocks while the buffer is full; fails if no reader is left to relay to, or if the
    /// slowest one stops reading.
    pub fn spill(&self, bytes: &[u8]) -> Result<(), RelayError> {
        let mut s = lock(&self.state);
        if !s.spilling {
            s.spilling = true;
            s.spill_start = s.on_disk;
        }
        loop {
            if s.readers.is_empty() {
                return Err(RelayError::NoReaders);
            }
            let slowest = s.readers.values().copied().min().unwrap_or(s.written);
            let drop_n = (slowest.saturating_sub(s.spill_start) as usize).min(s.spill.len());
            s.spill.drain(..drop_n);
            s.spill_start += drop_n as u64;
            if s.spill.len() + bytes.len() <= SPILL_MAX.max(bytes.len()) {
                break;
            }
            if s.last_progress.elapsed() > self.stall_limit {
                return Err(RelayError::SlowestReaderStalled(self.stall_limit));
            }
            s = self.changed.wait_timeout(s, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
        s.spill.extend(bytes);
        s.written += bytes.len() as u64;
        s.last_progress = Instant::now();
        drop(s);
        self.changed.notify_all();
        Ok(())
    }

    /// Writer: the download ended, verified (`Ok`) or not.
    pub fn finish(&self, outcome: Outcome) {
        lock(&self.state).outcome = Some(outcome);
        self.changed.notify_all();
    }

    /// Whether the download ended, and how.
    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.state).outcome.clone()
    }

    /// A new reader, starting at byte 0.
    pub fn reader(self: &Arc<Self>) -> DownloadBody {
        let mut s = lock(&self.state);
        let id = s.next_reader;
        s.next_reader += 1;
        s.readers.insert(id, 0);
        DownloadBody { download: self.clone(), id }
    }

    /// Reader `id`: blocks until more than `sent` bytes may be sent and says where they are.
    /// The last byte is held back until the file is verified.
    fn wait(&self, id: u64, sent: u64, client_gone: &dyn Fn() -> bool) -> Result<Chunk, Interrupted> {
        let mut s = lock(&self.state);
        s.readers.insert(id, sent);
        if s.spilling {
            self.changed.notify_all(); // the writer may be waiting for this reader
        }
        loop {
            let limit = match &s.outcome {
                Some(Ok(())) => self.total,
                Some(Err(e)) => return Err(Interrupted::Failed(e.clone())),
                // Small NARs are held back whole: streaming them gains nothing, and a client
                // that got no byte of a bad download retries it (Nix does), which then goes
                // to another upstream.
                None if self.total <= HOLD_WHOLE_UP_TO => 0,
                None => s.written.min(self.total.saturating_sub(1)),
            };
            if limit > sent {
                if sent < s.on_disk {
                    return Ok(Chunk::File { upto: limit.min(s.on_disk) });
                }
                if sent < s.spill_start {
                    return Err(failed(RelayError::BytesDropped));
                }
                let from = (sent - s.spill_start) as usize;
                let to = ((limit - s.spill_start) as usize).min(s.spill.len()).min(from + (256 << 10));
                return Ok(Chunk::Bytes(s.spill.range(from..to).copied().collect()));
            }
            if s.last_progress.elapsed() > self.stall_limit {
                return Err(failed(RelayError::Stalled(self.stall_limit)));
            }
            if client_gone() {
                return Err(Interrupted::ClientGone);
            }
            s = self
                .changed
                .wait_timeout(s, READER_NAP)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A reader's view of a [`Download`], as an HTTP body.
pub struct DownloadBody {
    download: Arc<Download>,
    id: u64,
}

impl Drop for DownloadBody {
    fn drop(&mut self) {
        lock(&self.download.state).readers.remove(&self.id);
        self.download.changed.notify_all();
    }
}

impl crate::http::Growing for DownloadBody {
    fn len(&self) -> u64 {
        self.download.total
    }
    fn file(&self) -> &File {
        &self.download.file
    }
    fn wait(&self, sent: u64, client_gone: &dyn Fn() -> bool) -> Result<Chunk, Interrupted> {
        self.download.wait(self.id, sent, client_gone)
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

    #[test]
    fn a_computation_every_caller_left_is_abandoned_and_the_next_caller_starts_afresh() {
        use std::sync::atomic::AtomicBool;
        let sf = Arc::new(SingleFlight::<u32, u32>::new());
        let (leader_gone, waiter_gone) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let stopped = Arc::new(AtomicBool::new(false));
        let leader = {
            let (sf, gone, stopped) = (sf.clone(), leader_gone.clone(), stopped.clone());
            std::thread::spawn(move || {
                sf.run_while(1, &|| gone.load(Ordering::SeqCst), |abandoned| {
                    let t = Instant::now();
                    while !abandoned() {
                        assert!(t.elapsed() < Duration::from_secs(10), "never abandoned");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    stopped.store(true, Ordering::SeqCst);
                    0
                })
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let waiter = {
            let (sf, gone) = (sf.clone(), waiter_gone.clone());
            std::thread::spawn(move || sf.run_while(1, &|| gone.load(Ordering::SeqCst), |_| 9))
        };
        std::thread::sleep(Duration::from_millis(50));
        leader_gone.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert!(!stopped.load(Ordering::SeqCst), "one caller still waits: the work goes on");
        waiter_gone.store(true, Ordering::SeqCst);
        assert_eq!(waiter.join().unwrap(), Err(Left), "the waiter left");
        assert!(leader.join().unwrap().is_ok(), "the leader returns its (unwanted) result");
        assert!(stopped.load(Ordering::SeqCst), "and stopped, since nobody waited any more");
        assert_eq!(sf.run(1, || 5), (5, true), "a later caller computes afresh");
    }

    fn download(total: u64) -> Arc<Download> {
        let f = File::open("/dev/null").unwrap();
        Arc::new(Download::new(f, total, Duration::from_secs(5)))
    }

    fn upto(c: Result<Chunk, Interrupted>) -> Result<u64, String> {
        match c.map_err(|e| e.to_string())? {
            Chunk::File { upto } => Ok(upto),
            Chunk::Bytes(_) => Err("expected file bytes".into()),
        }
    }

    fn failure(why: &str) -> Outcome {
        Err(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(why)))
    }

    #[test]
    fn small_nars_are_held_back_until_verified() {
        let d = download(10);
        let r = d.reader();
        d.progress(10);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| upto(d.wait(r.id, 0, &|| false)));
            std::thread::sleep(Duration::from_millis(50));
            d.finish(Ok(()));
            assert_eq!(waiter.join().unwrap(), Ok(10));
        });
    }

    #[test]
    fn readers_get_bytes_as_they_arrive_but_not_the_last_before_verification() {
        let d = download(HOLD_WHOLE_UP_TO + 10);
        let r = d.reader();
        d.progress(4);
        assert_eq!(upto(d.wait(r.id, 0, &|| false)), Ok(4));
        d.progress(HOLD_WHOLE_UP_TO + 10);
        assert_eq!(upto(d.wait(r.id, 4, &|| false)), Ok(HOLD_WHOLE_UP_TO + 9), "the last byte waits for the hash check");
        d.finish(Ok(()));
        assert_eq!(upto(d.wait(r.id, HOLD_WHOLE_UP_TO + 9, &|| false)), Ok(HOLD_WHOLE_UP_TO + 10));
    }



    #[test]
    fn bytes_whose_wake_up_was_saved_reach_a_waiting_reader_within_a_nap() {
        let d = download(HOLD_WHOLE_UP_TO + WAKE_EVERY_BYTES * 2);
        let r = d.reader();
        d.progress(100);
        assert_eq!(upto(d.wait(r.id, 0, &|| false)), Ok(100), "the first bytes wake at once");
        std::thread::scope(|s| {
            let t = Instant::now();
            let waiter = s.spawn(|| upto(d.wait(r.id, 100, &|| false)));
            std::thread::sleep(Duration::from_millis(20));
            d.progress(200); // within WAKE_AFTER of nothing, and far below WAKE_EVERY_BYTES
            let got = waiter.join().unwrap();
            assert_eq!(got, Ok(200));
            assert!(t.elapsed() < READER_NAP * 3, "seen after {:?}", t.elapsed());
        });
        d.progress(200 + WAKE_EVERY_BYTES);
        assert_eq!(upto(d.wait(r.id, 200, &|| false)), Ok(200 + WAKE_EVERY_BYTES));
    }

    #[test]
    fn a_failed_download_fails_its_readers() {
        let d = download(10);
        let r = d.reader();
        d.progress(10);
        d.finish(failure("hash mismatch"));
        assert_eq!(upto(d.wait(r.id, 9, &|| false)), Err("hash mismatch".to_string()));
    }

    #[test]
    fn when_the_disk_refuses_bytes_waiting_readers_get_them_from_memory() {
        let big = HOLD_WHOLE_UP_TO + 6;
        let d = download(big);
        let r = d.reader();
        d.progress(big - 6);
        d.spill(b"efghij").unwrap();
        assert_eq!(upto(d.wait(r.id, 0, &|| false)), Ok(big - 6), "what the file holds comes from the file");
        match d.wait(r.id, big - 6, &|| false) {
            Ok(Chunk::Bytes(b)) => assert_eq!(b, b"efghi", "the last byte is still held back"),
            _ => panic!("expected bytes from memory"),
        }
        d.finish(Ok(()));
        match d.wait(r.id, big - 1, &|| false) {
            Ok(Chunk::Bytes(b)) => assert_eq!(b, b"j"),
            _ => panic!("expected the last byte"),
        }
    }

    #[test]
    fn spilling_with_nobody_waiting_fails_the_download() {
        let d = download(10);
        assert!(d.spill(b"x").is_err());
    }
}
