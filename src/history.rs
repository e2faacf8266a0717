//! The last 24 hours, minute by minute, for the charts on the status page.
//!
//! `/metrics` has totals since start; a person opening the page wants to see *when*: did the
//! hit ratio drop this morning, did an upstream get slow an hour ago. So ncps keeps one bucket
//! per minute in a ring of [`MINUTES`] (1440 = 24 h), allocated once when it starts and never
//! grown: [`Minute`] is 128 bytes, the ring [`History::BYTES`] = 184,320 bytes (180 KiB),
//! whatever the traffic. Each bucket holds the requests answered from the store and from
//! upstreams, the bytes of each, and a small histogram of upstream narinfo lookup times
//! ([`Latency`], 24 counters with bounds a factor 2^(2/3) ≈ 1.59 apart from 0.5 ms to 13 s), so
//! p50 and p95 can be read for any minute or any run of minutes (histograms add up;
//! averages of percentiles would not). Upstreams also keep an hour of [`Latency`] each
//! ([`LatencyRing`], 60 × 104 = 6,240 bytes) for their row in the table.
//!
//! Recording is on the request path, so it takes no lock and allocates nothing: every field
//! is an atomic, and a bucket carries the minute it holds (`stamp`, minute + 1, 0 = never).
//! The first writer of a new minute claims the bucket with a compare-and-swap and zeroes it;
//! a bucket whose stamp is not the minute asked for reads as an idle minute, so gaps (no
//! traffic, or ncps stopped) need no work at all. The price: a count another thread adds in
//! the instant between the claim and the zeroing is lost, once per minute at most; a lock
//! taken by every request would cost more than that is worth.
//!
//! Time is passed in (minutes since start, from `Metrics`'s monotonic clock), so the module
//! is pure and the tests move the clock by hand.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Buckets in the ring: one per minute, 24 hours.
pub const MINUTES: usize = 24 * 60;
/// Counters in a [`Latency`] histogram; the last one is above every bound.
pub const LATENCY_BUCKETS: usize = 24;
/// Upper bound (ms) of the first latency bucket.
const FIRST_BOUND_MS: f64 = 0.5;
/// Buckets per doubling of the time.
const PER_DOUBLING: f64 = 1.5;

/// Upper bound in milliseconds of latency bucket `k` (`k < LATENCY_BUCKETS - 1`).
pub fn latency_bound_ms(k: usize) -> f64 {
    FIRST_BOUND_MS * (k as f64 / PER_DOUBLING).exp2()
}

/// The bucket a lookup of `ms` milliseconds is counted in.
fn latency_index(ms: f64) -> usize {
    if ms.is_nan() || ms <= FIRST_BOUND_MS {
        // A clock that went wrong counts as fast, not as a panic.
        return 0;
    }
    let k = ((ms / FIRST_BOUND_MS).log2() * PER_DOUBLING).ceil() as usize;
    // Float rounding at an exact bound: the bound belongs to its own bucket.
    let k = if k > 0 && ms <= latency_bound_ms(k - 1) { k - 1 } else { k };
    k.min(LATENCY_BUCKETS - 1)
}

/// A histogram of lookup times (counts per bucket, not cumulative).
#[derive(Default)]
pub struct Latency([AtomicU32; LATENCY_BUCKETS]);

impl Latency {
    pub fn observe(&self, ms: f64) {
        self.0[latency_index(ms)].fetch_add(1, Relaxed);
    }

    fn clear(&self) {
        for c in &self.0 {
            c.store(0, Relaxed);
        }
    }

    fn add_to(&self, into: &mut Percentiles) {
        for (sum, c) in into.counts.iter_mut().zip(&self.0) {
            *sum += u64::from(c.load(Relaxed));
        }
    }
}

/// Latency counts read out of one or more minutes, to ask for percentiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    counts: [u64; LATENCY_BUCKETS],
}

impl Percentiles {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn merge(&mut self, other: &Percentiles) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// The `q` quantile (0..=1) in milliseconds, `None` without observations. Within a bucket
    /// the time is interpolated geometrically (the bounds are), so the error is well under
    /// the bucket's factor of 1.59; above the last bound it is that bound (at least 13 s).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the observation wanted, 1-based.
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
        let mut below = 0u64;
        for (k, &n) in self.counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                if k == LATENCY_BUCKETS - 1 {
                    return Some(latency_bound_ms(k - 1));
                }
                let hi = latency_bound_ms(k);
                let lo = if k == 0 { hi / (1.0 / PER_DOUBLING).exp2() } else { latency_bound_ms(k - 1) };
                let within = (rank - below as f64) / n as f64;
                return Some(lo * (hi / lo).powf(within));
            }
            below += n;
        }
        None
    }
}

/// One minute of traffic.
#[derive(Default)]
pub struct Minute {
    /// The minute held, plus one; 0 for a bucket never used.
    stamp: AtomicU64,
    hits: AtomicU32,
    misses: AtomicU32,
    bytes_cache: AtomicU64,
    bytes_fetched: AtomicU64,
    latency: Latency,
}

impl Minute {
    fn clear(&self) {
        self.hits.store(0, Relaxed);
        self.misses.store(0, Relaxed);
        self.bytes_cache.store(0, Relaxed);
        self.bytes_fetched.store(0, Relaxed);
        self.latency.clear();
    }
}

/// What happened in one minute (or a run of minutes added together).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub hits: u64,
    pub misses: u64,
    /// Bytes sent to clients from the local store.
    pub bytes_cache: u64,
    /// Bytes received from upstreams.
    pub bytes_fetched: u64,
    /// Upstream narinfo lookup times.
    pub latency: Percentiles,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.bytes_cache += other.bytes_cache;
        self.bytes_fetched += other.bytes_fetched;
        self.latency.merge(&other.latency);
    }

    /// Hits among hits and misses (as [`crate::metrics::KindStats::hit_ratio`]).
    pub fn hit_ratio(&self) -> Option<f64> {
        let all = self.hits + self.misses;
        (all > 0).then(|| self.hits as f64 / all as f64)
    }

    pub fn is_idle(&self) -> bool {
        self.hits == 0 && self.misses == 0 && self.bytes_cache == 0 && self.bytes_fetched == 0 && self.latency.count() == 0
    }
}

/// Finds (claiming and zeroing if needed) the slot for `minute` in a ring of stamped slots.
/// `None` if a writer with a later clock already took it (the sample is then dropped rather
/// than counted in the wrong day).
fn claim<T>(slots: &[T], stamp: impl Fn(&T) -> &AtomicU64, clear: impl Fn(&T), minute: u64) -> Option<&T> {
    let len = slots.len() as u64;
    let slot = &slots[(minute % len) as usize];
    let want = minute + 1;
    let s = stamp(slot);
    let mut seen = s.load(Relaxed);
    while seen != want {
        if seen > want {
            return None;
        }
        match s.compare_exchange(seen, want, Relaxed, Relaxed) {
            Ok(_) => {
                clear(slot);
                break;
            }
            Err(now) => seen = now,
        }
    }
    Some(slot)
}

/// The last [`MINUTES`] minutes.
pub struct History {
    minutes: Box<[Minute]>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// Memory the ring takes, allocated once in [`History::new`].
    pub const BYTES: usize = MINUTES * std::mem::size_of::<Minute>();

    pub fn new() -> History {
        History { minutes: (0..MINUTES).map(|_| Minute::default()).collect() }
    }

    fn at(&self, minute: u64) -> Option<&Minute> {
        claim(&self.minutes, |m| &m.stamp, Minute::clear, minute)
    }

    /// A request answered from the store (`hit`) or from an upstream, with the body bytes it
    /// was answered with (counted as served from cache only for a hit).
    pub fn served(&self, minute: u64, hit: bool, bytes: u64) {
        let Some(m) = self.at(minute) else { return };
        if hit {
            m.hits.fetch_add(1, Relaxed);
            m.bytes_cache.fetch_add(bytes, Relaxed);
        } else {
            m.misses.fetch_add(1, Relaxed);
        }
    }

    /// Bytes received from an upstream.
    pub fn fetched(&self, minute: u64, bytes: u64) {
        if let Some(m) = self.at(minute) {
            m.bytes_fetched.fetch_add(bytes, Relaxed);
        }
    }

    /// An upstream narinfo lookup that took `ms` to its answer.
    pub fn lookup(&self, minute: u64, ms: f64) {
        if let Some(m) = self.at(minute) {
            m.latency.observe(ms);
        }
    }

    /// Minute `minute` as recorded; idle (all zero) if nothing was recorded in it or it is
    /// more than 24 hours before the newest bucket written.
    pub fn minute(&self, minute: u64) -> Totals {
        let m = &self.minutes[(minute % MINUTES as u64) as usize];
        let mut t = Totals::default();
        if m.stamp.load(Relaxed) != minute + 1 {
            return t;
        }
        t.hits = u64::from(m.hits.load(Relaxed));
        t.misses = u64::from(m.misses.load(Relaxed));
        t.bytes_cache = m.bytes_cache.load(Relaxed);
        t.bytes_fetched = m.bytes_fetched.load(Relaxed);
        m.latency.add_to(&mut t.latency);
        t
    }

    /// The 24 hours up to and including minute `now`, in `columns` equal runs of minutes
    /// (oldest first; `columns` is clamped to 1..=[`MINUTES`] and should divide it), each the
    /// sum of its minutes. Minutes before the clock started (negative) are idle.
    pub fn columns(&self, now: u64, columns: usize) -> Vec<Totals> {
        let columns = columns.clamp(1, MINUTES);
        let per = MINUTES.div_ceil(columns);
        let first = now as i64 - (columns * per) as i64 + 1;
        (0..columns)
            .map(|c| {
                let mut t = Totals::default();
                for i in 0..per {
                    let minute = first + (c * per + i) as i64;
                    if minute >= 0 {
                        t.add(&self.minute(minute as u64));
                    }
                }
                t
            })
            .collect()
    }
}

/// An hour of latency histograms for one upstream.
pub struct LatencyRing {
    minutes: Box<[(AtomicU64, Latency)]>,
}

impl Default for LatencyRing {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRing {
    pub const MINUTES: usize = 60;

    pub fn new() -> LatencyRing {
        LatencyRing { minutes: (0..Self::MINUTES).map(|_| Default::default()).collect() }
    }

    pub fn observe(&self, minute: u64, ms: f64) {
        if let Some((_, l)) = claim(&self.minutes, |(s, _)| s, |(_, l)| l.clear(), minute) {
            l.observe(ms);
        }
    }

    /// Every lookup in the hour up to and including minute `now`.
    pub fn last_hour(&self, now: u64) -> Percentiles {
        let mut p = Percentiles::default();
        for back in 0..Self::MINUTES as u64 {
            let Some(minute) = now.checked_sub(back) else { break };
            let (stamp, l) = &self.minutes[(minute % Self::MINUTES as u64) as usize];
            if stamp.load(Relaxed) == minute + 1 {
                l.add_to(&mut p);
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_is_fixed_at_180_kib() {
        assert_eq!(std::mem::size_of::<Minute>(), 128);
        assert_eq!(History::BYTES, 184_320);
        assert_eq!(History::new().minutes.len(), MINUTES);
        assert_eq!(std::mem::size_of::<(AtomicU64, Latency)>() * LatencyRing::MINUTES, 6_240);
    }

    #[test]
    fn a_new_minute_starts_from_zero_and_the_old_one_keeps_its_counts() {
        let h = History::new();
        h.served(5, true, 100);
        h.served(5, false, 7);
        h.fetched(5, 40);
        h.served(6, true, 1);
        assert_eq!(h.minute(5), Totals { hits: 1, misses: 1, bytes_cache: 100, bytes_fetched: 40, ..Default::default() });
        assert_eq!(h.minute(6).hits, 1);
        assert_eq!(h.minute(6).misses, 0);
        assert_eq!(h.minute(5).hit_ratio(), Some(0.5));
    }

    #[test]
    fn idle_minutes_read_as_zero_without_being_written() {
        let h = History::new();
        h.served(10, true, 5);
        h.served(200, true, 5);
        for m in 11..200 {
            assert!(h.minute(m).is_idle(), "minute {m}");
        }
        assert_eq!(h.minute(0), Totals::default());
        assert_eq!(h.minute(10).hits, 1);
    }

    #[test]
    fn after_24_hours_a_bucket_is_reused_and_the_day_old_minute_is_gone() {
        let h = History::new();
        h.served(3, true, 10);
        h.lookup(3, 20.0);
        let next_day = 3 + MINUTES as u64;
        assert_eq!(h.minute(next_day), Totals::default(), "not written yet: the old stamp does not match");
        h.served(next_day, false, 0);
        let t = h.minute(next_day);
        assert_eq!((t.hits, t.misses, t.bytes_cache, t.latency.count()), (0, 1, 0, 0));
        // The old minute is no longer there to read.
        assert!(h.minute(3).is_idle());
        // A late writer with an older clock does not clear the newer minute.
        h.served(3, true, 10);
        assert_eq!(h.minute(next_day).misses, 1);
        assert!(h.minute(3).is_idle());
    }

    #[test]
    fn columns_cover_the_last_day_oldest_first() {
        let h = History::new();
        let now = 5000;
        h.served(now, true, 1);
        h.served(now - 4, true, 1);
        h.served(now - 5, false, 1);
        h.served(now - MINUTES as u64, true, 1); // just outside the window
        let cols = h.columns(now, 288);
        assert_eq!(cols.len(), 288);
        assert_eq!(cols[287].hits, 2, "the newest five minutes: now and now-4");
        assert_eq!(cols[286].misses, 1);
        let all = cols.iter().fold(Totals::default(), |mut a, c| {
            a.add(c);
            a
        });
        assert_eq!((all.hits, all.misses), (2, 1));
    }

    #[test]
    fn columns_before_the_clock_started_are_idle() {
        let h = History::new();
        h.served(0, true, 1);
        let cols = h.columns(0, 288);
        assert_eq!(cols.len(), 288);
        assert_eq!(cols[287].hits, 1);
        assert!(cols[..287].iter().all(Totals::is_idle));
        assert_eq!(h.columns(0, 0).len(), 1);
        assert_eq!(h.columns(0, 100_000).len(), MINUTES);
    }

    #[test]
    fn latency_buckets_hold_their_bounds() {
        assert_eq!(latency_index(0.0), 0);
        assert_eq!(latency_index(f64::NAN), 0);
        assert_eq!(latency_index(0.5), 0);
        assert_eq!(latency_index(0.51), 1);
        for k in 0..LATENCY_BUCKETS - 1 {
            assert_eq!(latency_index(latency_bound_ms(k)), k, "bound {k}");
            assert_eq!(latency_index(latency_bound_ms(k) * 1.01), k + 1, "above bound {k}");
        }
        assert_eq!(latency_index(1e9), LATENCY_BUCKETS - 1);
        assert!((latency_bound_ms(LATENCY_BUCKETS - 2) - 13_004.0).abs() < 1.0);
    }

    #[test]
    fn percentiles_are_within_a_bucket_of_the_truth() {
        let h = History::new();
        // 90 fast lookups (2 ms) and 10 slow ones (300 ms).
        for _ in 0..90 {
            h.lookup(1, 2.0);
        }
        for _ in 0..10 {
            h.lookup(1, 300.0);
        }
        let p = h.minute(1).latency;
        assert_eq!(p.count(), 100);
        let p50 = p.quantile_ms(0.5).unwrap();
        let p95 = p.quantile_ms(0.95).unwrap();
        assert!(p50 > 2.0 / 1.6 && p50 < 2.0 * 1.6, "p50 {p50}");
        assert!(p95 > 300.0 / 1.6 && p95 < 300.0 * 1.6, "p95 {p95}");
        assert!(Percentiles::default().quantile_ms(0.5).is_none());
        // Above every bound: the last bound, not infinity.
        let h = History::new();
        h.lookup(1, 60_000.0);
        assert!((h.minute(1).latency.quantile_ms(0.99).unwrap() - latency_bound_ms(LATENCY_BUCKETS - 2)).abs() < 1e-6);
    }

    #[test]
    fn percentiles_of_a_run_of_minutes_come_from_their_added_histograms() {
        let h = History::new();
        for _ in 0..99 {
            h.lookup(1, 1.0);
        }
        h.lookup(2, 1000.0);
        let mut both = h.minute(1);
        both.add(&h.minute(2));
        // One slow lookup in a hundred is not the median of two minutes' medians.
        let p50 = both.latency.quantile_ms(0.5).unwrap();
        assert!(p50 < 2.0, "{p50}");
        let max = both.latency.quantile_ms(1.0).unwrap();
        assert!(max > 600.0, "{max}");
    }

    #[test]
    fn an_upstreams_hour_forgets_older_lookups() {
        let r = LatencyRing::new();
        r.observe(0, 5.0);
        r.observe(30, 5.0);
        r.observe(59, 5.0);
        assert_eq!(r.last_hour(59).count(), 3);
        assert_eq!(r.last_hour(60).count(), 2, "minute 0 is more than an hour before minute 60");
        r.observe(61, 5.0); // reuses minute 1's slot
        assert_eq!(r.last_hour(61).count(), 3);
        assert_eq!(r.last_hour(200).count(), 0);
        assert_eq!(LatencyRing::new().last_hour(0).count(), 0);
    }
}
