//! A small in-memory copy of recently served narinfos.
//!
//! A narinfo hit from disk costs an open, a stat, a read and a close; from memory it costs
//! nothing but the send. nginx gets the same from `open_file_cache`, and the narinfo hit
//! benchmark compares against that. Entries are bounded in total bytes, expire after a minute
//! (so a file changed behind ncps's back is seen again), and are dropped by the cache core
//! whenever it replaces or removes a narinfo.

use crate::nix::StorePathHash;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Memo {
    entries: HashMap<StorePathHash, (Arc<[u8]>, Instant)>,
    /// Insertion order, for dropping the oldest when over budget. An entry here whose time
    /// differs from the map's is stale (removed or replaced since) and is skipped.
    order: VecDeque<(StorePathHash, Instant)>,
    bytes: usize,
    budget: usize,
    ttl: Duration,
    /// How many times [`Memo::remove`] was called: a read from the store that began before a
    /// removal may have read a file that is gone now, and is not kept ([`Memo::insert_read`]).
    removals: u64,
}

impl Memo {
    pub fn new(budget: usize, ttl: Duration) -> Memo {
        Memo { entries: HashMap::new(), order: VecDeque::new(), bytes: 0, budget, ttl, removals: 0 }
    }

    pub fn get(&mut self, hash: &StorePathHash) -> Option<Arc<[u8]>> {
        match self.entries.get(hash) {
            Some((bytes, at)) if at.elapsed() < self.ttl => Some(bytes.clone()),
            Some(_) => {
                self.drop_entry(hash);
                None
            }
            None => None,
        }
    }

    /// Keeps what a read from the store found, unless something was removed since
    /// `removals_before` ([`Memo::removals`], taken before the read): the read may have raced
    /// the removal of its file (removals forget after the unlink), and a copy
    /// kept now would be served after its NAR is gone.
    pub fn insert_read(&mut self, hash: StorePathHash, bytes: Arc<[u8]>, removals_before: u64) {
        if self.removals == removals_before {
            self.insert(hash, bytes);
        }
    }

    /// Keeps a narinfo just written in place of what was there: a removal of the old bytes
    /// (so a read of the old file that began before cannot put them back), then the new.
    pub fn replace(&mut self, hash: StorePathHash, bytes: Arc<[u8]>) {
        self.remove(&hash);
        self.insert(hash, bytes);
    }

    pub fn removals(&self) -> u64 {
        self.removals
    }

    fn insert(&mut self, hash: StorePathHash, bytes: Arc<[u8]>) {
        if bytes.len() > self.budget / 16 {
            return;
        }
        self.drop_entry(&hash);
        let now = Instant::now();
        self.bytes += bytes.len();
        self.entries.insert(hash, (bytes, now));
        self.order.push_back((hash, now));
        while self.bytes > self.budget {
            let Some((old, at)) = self.order.pop_front() else { break };
            if self.entries.get(&old).is_some_and(|(_, t)| *t == at) {
                self.drop_entry(&old);
            }
        }
        // Stale queue entries pile up when the same narinfos are replaced often; rebuild.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(h, at)| entries.get(h).is_some_and(|(_, t)| t == at));
        }
    }

    /// Forgets a narinfo that was replaced or removed (whether or not it is here).
    pub fn remove(&mut self, hash: &StorePathHash) {
        self.removals += 1;
        self.drop_entry(hash);
    }

    fn drop_entry(&mut self, hash: &StorePathHash) {
        if let Some((b, _)) = self.entries.remove(hash) {
            self.bytes -= b.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(c: char) -> StorePathHash {
        StorePathHash::parse(&c.to_string().repeat(32)).unwrap()
    }

    #[test]
    fn a_read_that_began_before_a_removal_is_not_kept_and_one_after_it_is() {
        let mut m = Memo::new(64, Duration::from_secs(60));
        let before = m.removals();
        m.remove(&h('a')); // an eviction unlinks a's file, then forgets a (not even memoized)
        m.insert_read(h('a'), Arc::from(&[1u8; 4][..]), before);
        assert!(m.get(&h('a')).is_none(), "what the racing read found is not served later");
        let now = m.removals();
        m.insert_read(h('a'), Arc::from(&[1u8; 4][..]), now);
        assert!(m.get(&h('a')).is_some());
        // A write in place: what a read of the old file found does not replace the new bytes.
        let before = m.removals();
        m.replace(h('a'), Arc::from(&[2u8; 4][..]));
        m.insert_read(h('a'), Arc::from(&[1u8; 4][..]), before);
        assert_eq!(&m.get(&h('a')).unwrap()[..], &[2u8; 4]);
        // Entries leaving by age or budget are no removal: they do not refuse other reads.
        let mut m = Memo::new(64, Duration::ZERO);
        m.insert(h('b'), Arc::from(&[1u8; 4][..]));
        let before = m.removals();
        assert!(m.get(&h('b')).is_none(), "expired");
        assert_eq!(m.removals(), before);
    }

    #[test]
    fn stays_within_its_budget_dropping_the_oldest() {
        let mut m = Memo::new(64, Duration::from_secs(60));
        m.insert(h('a'), Arc::from(&[1u8; 4][..]));
        for c in ['b', 'c', 'd', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'p', 'q', 'r', 's', 'v'] {
            m.insert(h(c), Arc::from(&[2u8; 4][..]));
        }
        assert!(m.bytes <= 64);
        assert!(m.get(&h('a')).is_none(), "the oldest went first");
        assert!(m.get(&h('v')).is_some());
    }

    #[test]
    fn entries_expire_and_can_be_removed() {
        let mut m = Memo::new(1024, Duration::ZERO);
        m.insert(h('a'), Arc::from(&b"x"[..]));
        assert!(m.get(&h('a')).is_none());
        let mut m = Memo::new(1024, Duration::from_secs(60));
        m.insert(h('a'), Arc::from(&b"x"[..]));
        m.remove(&h('a'));
        assert!(m.get(&h('a')).is_none());
        assert_eq!(m.bytes, 0);
    }
}
